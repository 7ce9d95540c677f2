"""Slow reference implementations of the original code's approach, for equivalence tests and benchmarks; not used by the scripts."""
import math

import torch
from torch import nn


def reference_online_sgd(student, inputs, labels, lr, epochs=1, momentum=0.0):
    """Online SGD one sample at a time through autograd, as the original code did it.

    loss = MSELoss(yhat, y) = (yhat - y)^2; after backward the first layer's gradient is scaled
    by sqrt(N)/2 and the second's halved; torch.optim.SGD with learning rate eta/sqrt(N) for
    w1 and eta/N for w2 (w2 left out in `soft_committee` mode). inputs (P, N), labels (P,);
    works in the student's dtype (float32, or float64 after student.double()). Returns the
    student, trained in place.
    """
    n_in = student.input_dim
    dtype = student.w1.weight.dtype
    groups = [{"params": [student.w1.weight], "lr": lr / math.sqrt(n_in)}]
    if student.mode != "soft_committee":
        groups.append({"params": [student.w2.weight], "lr": lr / n_in})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    criterion = nn.MSELoss()
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels).reshape(-1)
    for _ in range(int(epochs)):
        for p in range(inputs.shape[0]):
            x = inputs[p:p + 1].to(dtype)     # (1, N)
            y = labels[p:p + 1].to(dtype)     # (1,)
            optimizer.zero_grad()
            loss = criterion(student(x), y)
            loss.backward()
            student.w1.weight.grad *= math.sqrt(n_in) / 2.0
            if student.w2.weight.grad is not None:
                student.w2.weight.grad /= 2.0
            optimizer.step()
    return student


def reference_test_loss(student, inputs, labels):
    """Test loss 0.5 * mean((yhat - y)^2), one sample at a time like the original testing."""
    dtype = student.w1.weight.dtype
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels).reshape(-1)
    total = 0.0
    with torch.no_grad():
        for p in range(inputs.shape[0]):
            yhat = student(inputs[p:p + 1].to(dtype))
            total += 0.5 * float((yhat - labels[p:p + 1].to(dtype)) ** 2)
    return total / max(1, inputs.shape[0])
