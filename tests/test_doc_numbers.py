"""The numbers the docs quote about the committed runs, checked against those runs: each
phrase below is computed from docs/runs/<run>/*.csv as the prose states it, and must appear
in the page word for word. A run regenerated with other results, or a sentence edited by
hand, fails here until the two agree again."""
import csv
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_METHODS = ("dpp_node", "random_node", "importance_node")


def table(run, name):
    with open(os.path.join(ROOT, "docs", "runs", run, f"{name}.csv"), newline="") as f:
        return list(csv.DictReader(f))


def page(name):
    with open(os.path.join(ROOT, name)) as f:
        return " ".join(f.read().split())                   # line breaks do not matter


def claims(run, claim, size=None, teacher=2, rescale=1, nodes=None, noise=None):
    """The rows judged on the expected losses of one claim at K = size (every K if None; and
    M, rescaling, the node budgets and noise levels given)."""
    return [r for r in table(run, "claims") if r["judged_on"] == "expected"
            and r["claim"] == claim and (size is None or int(r["student_h_size"]) == size)
            and int(r["teacher_h_size"]) == teacher and int(r["rescale"]) == rescale
            and (nodes is None or int(r["nodes_equivalent"]) in nodes)
            and (noise is None or float(r["noise"]) == noise)]


def span(rows, sign=-1):
    """'a–b%': the range of sign · relative difference in whole percent."""
    values = [round(sign * 100 * float(r["relative"])) for r in rows]
    assert values, "no rows"
    return f"{min(values)}–{max(values)}%"


def verdicts(rows):
    return {r["verdict"].split(" at ")[0] for r in rows}


SETTING = ("claim", "noise", "student_h_size", "teacher_h_size", "rescale", "nodes_equivalent")


def side_by_side(rows, over):
    """{setting less `over`: {row[over]: row}}: claims.csv's rows of each setting side by side
    along one column (judged_on, rescale)."""
    found = {}
    for r in rows:
        found.setdefault(tuple(r[k] for k in SETTING if k != over), {})[r[over]] = r
    return found


def never_reversed(a, b):
    """Two verdicts of one setting: never 'holds' against 'fails'."""
    word = {"holds": 1, "fails": -1}
    assert word.get(a["verdict"], 0) * word.get(b["verdict"], 0) >= 0, (a, b)


def students_agreeing(rows):
    """'in every student', or 'in every student but …' naming the settings where fewer agree."""
    fewer = [r for r in rows if r["agree"] != r["students"]]
    if not fewer:
        return "in every student"
    return "in every student but " + "; ".join(
        f"{r['agree']} of {r['students']} at σ = {float(r['noise']):g}, "
        f"{r['nodes_equivalent']} nodes" for r in fewer)


def k6_dpp_beats_random():
    rows = claims("paper", "dpp_node below random_node", 6, nodes={2, 3, 4})
    assert verdicts(rows) == {"holds"}
    return f"by {span(rows)} at 2–4 of 6 nodes, {students_agreeing(rows)}"


def k6_reweighted_gain():
    rows = claims("paper", "dpp_node below random_node, reweighted", 6, nodes={2, 3})
    assert verdicts(rows) == {"holds"}
    return f"far larger ({span(rows)} at 2–3 nodes)"


def k20_dpp_loses():
    rows = claims("paper", "dpp_node below random_node", 20, nodes={2, 3, 4, 5})
    assert verdicts(rows) == {"fails"}
    return f"(by up to {max(round(100 * float(r['relative'])) for r in rows)}%) at 2–5 nodes"


def dpp_edge_against_random_and_importance():
    better = claims("paper", "dpp_edge below random_edge", 6)
    worse = claims("paper", "dpp_edge below importance_edge", 6)
    assert verdicts(better) == {"holds"} and verdicts(worse) == {"fails"}
    return (f"by {span(better)} everywhere, but **loses to importance_edge** (largest |w|) "
            f"everywhere, by {span(worse, sign=1)}")


def dpp_edge_below_dpp_node():
    rows = claims("paper", "edge below node: dpp_edge below dpp_node", 6)
    assert verdicts(rows) == {"holds"}
    return f"dpp_edge is {span(rows)} below dpp_node everywhere"


def random_edge_above_dpp_node():
    rows = claims("paper", "edge below node: random_edge below dpp_node", 6, noise=0.0,
                  nodes={2, 3, 4, 5})
    assert verdicts(rows) == {"fails"}
    assert verdicts(claims("paper", "edge below node: random_edge below dpp_node", 20)) == {
        "holds"}
    return f"from 2 nodes on random_edge is {span(rows, sign=1)} *above* dpp_node (σ = 0)"


def reweighting_node_methods():
    rows = [r for m in NODE_METHODS for size in (6, 20)
            for r in claims("paper", f"reweighting lowers {m}", size)]
    open_ = [r for r in rows if r["verdict"] != "holds"]
    assert {r["claim"] for r in open_} <= {"reweighting lowers importance_node"}
    rescale0 = [r for m in NODE_METHODS for size in (6, 20)
                for r in claims("paper", f"reweighting lowers {m}", size, rescale=0)
                if r["verdict"] != "holds"]
    return (f"({span(rows)} at K = 6 and 20; resolved in all but {len(open_)} importance_node "
            f"cells, and {len(rescale0)} more with rows pruned as trained")


def specialisation():
    rows = [r for r in table("paper", "specialisation") if r["student_h_size"] == "6"
            and r["rescale"] == "1" and r["teacher_h_size"] == "2"]
    assert {r["student_nodes"] for r in rows} == {"3"}
    at = {noise: [float(r["effective_v"]) for r in rows if float(r["noise"]) == noise]
          for noise in (0.0, 0.25)}
    return (f"effective outgoing weights of {min(at[0.0]):.2f}–{max(at[0.0]):.2f} per group at "
            f"σ = 0 ({min(at[0.25]):.2f}–{max(at[0.25]):.2f} at σ = 0.25)")


def theory_against_expected():
    """How many verdicts the N → ∞ theory changes, and that none turns holds into fails."""
    pairs = [(d["expected"], d["theory"])
             for d in side_by_side(table("paper", "claims"), "judged_on").values()
             if {"expected", "theory"} <= set(d)]
    moved = [(e, t) for e, t in pairs if e["verdict"] != t["verdict"]]
    for e, t in moved:
        never_reversed(e, t)
        a, b = float(e["relative"]), float(t["relative"])
        assert a * b > 0 or max(abs(a), abs(b)) < 1e-3 or b == 0.0
    importance = sum("importance_node" in e["claim"] for e, _ in moved)
    reweighted_edges = sum(e["claim"] in ("reweighting lowers random_edge",
                                          "reweighting lowers importance_edge",
                                          "reweighting lowers dpp_edge") for e, _ in moved)
    others = [(e, t) for e, t in moved if "importance_node" not in e["claim"]
              and e["claim"] not in ("reweighting lowers random_edge",
                                     "reweighting lowers importance_edge",
                                     "reweighting lowers dpp_edge")]
    far = max(others, key=lambda p: abs(float(p[0]["relative"]) - float(p[1]["relative"])))
    apart = abs(float(far[0]["relative"]) - float(far[1]["relative"]))
    far = " and ".join(f"{100 * float(r['relative']):.1f}%".replace("-", "−") for r in far)
    return (f"{len(pairs) - len(moved)} of the {len(pairs)} verdicts are those of the expected "
            f"losses. None of the other {len(moved)} turns a holds into a fails or back: each "
            f"moves between a verdict and \"not resolved\", and the two mean differences have the "
            f"same sign wherever either exceeds 0.1% and the theory's is not exactly zero. "
            f"{importance} of them compare "
            f"importance_node", f"{['No', 'One', 'Two', 'Three'][reweighted_edges]} are edge "
            "reweighting", f"The other {len(others)} have mean differences within "
            f"{100 * apart:.1f} percentage points of each other ({far} at the farthest)")


def nodes_phrase(nodes):
    """'2 nodes', '2 and 3 nodes', '1–3 nodes' (a run of three or more)."""
    nodes = sorted(set(nodes))
    if len(nodes) == 1:
        return f"{nodes[0]} node" + ("s" if nodes[0] != 1 else "")
    if len(nodes) == 2:
        return f"{nodes[0]} and {nodes[1]} nodes"
    assert nodes == list(range(nodes[0], nodes[-1] + 1)), nodes
    return f"{nodes[0]}–{nodes[-1]} nodes"


def percents(rows, sign):
    """'7%', '5–6%' (whole percent), or '0.06–0.15%' where every difference is below 1%."""
    values = [sign * 100 * float(r["relative"]) for r in rows]
    digits = 2 if max(abs(v) for v in values) < 1 else 0
    found = sorted({round(v, digits) for v in values})
    text = [f"{v:.{digits}f}" for v in (found[0], found[-1])]
    return f"{text[0]}%" if text[0] == text[1] else f"{text[0]}–{text[1]}%"


def listing(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def wins_and_losses(rows, by="student_h_size"):
    """Where a claim 'a below b' holds and where it fails, setting by setting (by K or by σ),
    with the mean differences: 'wins at K = 4 (2 nodes, by 7%) and K = 6 (2 and 3 nodes, by
    5–6%); loses at K = 12 (3 nodes, by 10%)'."""
    label = {"student_h_size": lambda v: f"K = {int(v)}",
             "noise": lambda v: f"σ = {float(v):g}"}[by]
    assert len({(r[by], r["nodes_equivalent"]) for r in rows}) == len(rows), "one row a cell"
    parts = []
    for verdict, word, sign in (("holds", "wins", -1), ("fails", "loses", 1)):
        at = {}
        for r in rows:
            if r["verdict"] == verdict:
                at.setdefault(float(r[by]), []).append(r)
        if at:
            parts.append(f"{word} at " + listing(
                f"{label(value)} ({nodes_phrase(int(r['nodes_equivalent']) for r in found)}, by "
                f"{percents(found, sign)})" for value, found in sorted(at.items())))
    return "; ".join(parts) if parts else "is not resolved anywhere"


def width_at_zero_noise():
    """The student-width study's answer at σ = 0, as README.md gives it."""
    def rows(claim):
        return claims("student_width", claim, noise=0.0)
    return (f"against random node pruning DPP {wins_and_losses(rows('dpp_node below random_node'))}"
            f". With reweighting it "
            f"{wins_and_losses(rows('dpp_node below random_node, reweighted'))}. Against "
            f"importance (largest |v|) node pruning it "
            f"{wins_and_losses(rows('dpp_node below importance_node'))}")


def mean_over_students(rows, column):
    found = {}
    for r in rows:
        key = (r["method"], int(r["reweighting"]), int(r["nodes_equivalent"]), float(r["noise"]))
        found.setdefault(key, []).append(float(r[column]))
    return {key: sum(v) / len(v) for key, v in found.items()}


def paper_rows(name, size=6, teacher=2, **where):
    return [r for r in table("paper", name) if int(r["student_h_size"]) == size
            and int(r["teacher_h_size"]) == teacher
            and all(float(r[k]) == v for k, v in where.items())]


def unpruned_as_trained_and_rescaled():
    def span_of(rescale):
        rows = paper_rows("results", noise=0.0, rescale=rescale)
        losses = {r["student"]: float(r["unpruned_test_loss"]) for r in rows}
        return f"{min(losses.values()):.3f}–{max(losses.values()):.3f}", len(losses)
    trained, students = span_of(0)
    rescaled, _ = span_of(1)
    return (f"the unpruned test loss is {trained} as trained and {rescaled} rescaled "
            f"({students} students, K = 6)")


def rescaling_lowers_losses():
    """How much pruning the rows as trained lowers each method's expected loss (K = 6, σ = 0,
    no reweighting, mean over students), and that no verdict changes direction."""
    at = {rescale: mean_over_students(paper_rows("expectations", noise=0.0, rescale=rescale,
                                                 reweighting=0), "expected")
          for rescale in (0, 1)}
    parts = []
    for method in ("dpp_node", "dpp_edge", "random_node", "random_edge", "importance_node",
                   "importance_edge"):
        change = {key[2]: 100 * (at[0][key] / at[1][key] - 1) for key in at[1]
                  if key[0] == method}
        lower = [-c for c in change.values() if round(c) < 0]
        rises = {n: c for n, c in change.items() if round(c) > 0}
        text = f"{round(min(lower))}–{round(max(lower))}% for {method}"
        if rises:
            rising = listing(f"{round(c)}% at {nodes_phrase([n])}"
                             for n, c in sorted(rises.items()))
            text = f"up to {round(max(lower))}% for {method} (which rises by {rising})"
        parts.append(text)
    expected = [r for r in table("paper", "claims") if r["judged_on"] == "expected"]
    for both in side_by_side(expected, "rescale").values():
        if len(both) == 2:
            never_reversed(both["0"], both["1"])
    beats = claims("paper", "dpp_node below random_node", 6, rescale=0, noise=0.0)
    holds = [r for r in beats if r["verdict"] == "holds"]
    return ("by " + ", ".join(parts[:-1]) + " and " + parts[-1],
            f"with rows as trained dpp_node beats random_node at "
            f"{nodes_phrase(int(r['nodes_equivalent']) for r in holds)} (by {percents(holds, -1)})")


def k20_larger_teacher():
    with open(os.path.join(ROOT, "docs", "runs", "paper", "study.json")) as f:
        simulated = next(p["methods"] for p in json.load(f)["panels"]
                         if p["student_h_size"] == 20)
    rows = [r for r in paper_rows("expectations", size=20, teacher=4, reweighting=0)
            if r["method"] in simulated]
    means = mean_over_students(rows, "expected")
    low = [v for key, v in means.items() if key[2] == 1]
    high = [v for key, v in means.items() if key[2] == 5]
    level = claims("paper", "dpp_node below random_node", 20, teacher=4)
    reweighted = claims("paper", "dpp_node below random_node, reweighted", 20, teacher=4)
    edge = claims("paper", "edge below node: random_edge below dpp_node", 20, teacher=4)
    level, reweighted, edge = (wins_and_losses(rows, by="noise")
                               for rows in (level, reweighted, edge))
    students = len({r["student"] for r in rows})
    return (f"The expected losses of {' and '.join(simulated)} (mean over {students} students, "
            f"both noise levels, no reweighting) run from {min(low):.1f}–{max(low):.1f} at 5% of "
            f"the parameters to {min(high):.1f}–{max(high):.1f} at 25%",
            f"dpp_node against random_node without reweighting {level}",
            f"with reweighting it {reweighted}", f"random_edge against dpp_node {edge}")


def finite_size_findings():
    """What the finite-size study shows, as docs/theory.md states it."""
    gaps = table("finite_size", "finite_size")
    slopes = table("finite_size", "finite_size_slopes")
    weights = table("finite_size", "finite_size_weights")
    sizes = sorted({int(r["input_dim"]) for r in gaps})

    def signed(x):
        return f"{x:+.2f}".replace("-", "−")

    def pcts(values):
        return f"{100 * min(values):.2g}–{100 * max(values):.2g}%"

    def kurtosis_at(n):
        return [float(r["kurtosis_rms"]) for r in weights if int(r["input_dim"]) == n]

    def sampling_at(n):
        sd = next(float(r["kurtosis_sampling_sd"]) for r in weights if int(r["input_dim"]) == n)
        return f"{sd:.2f}"

    noisy = sorted(float(r["slope"]) for r in slopes if float(r["noise"]) == 0.25)
    assert all(x < 0 for x in noisy)
    median = (noisy[len(noisy) // 2 - 1] + noisy[len(noisy) // 2]) / 2
    about_root = sum(-0.7 <= x <= -0.3 for x in noisy)
    random_edge = [float(r["pruning_slope"]) for r in slopes
                   if r["method"] == "random_edge" and r["reweighting"] == "0"]
    node_part = max(float(r["pruning_gap_rms"]) for r in gaps if r["method"].endswith("_node"))
    shaped = [r for r in gaps if r["method"] in ("dpp_edge", "importance_edge")
              and r["reweighting"] == "0"]
    first = [float(r["gap_rms"]) for r in shaped if int(r["input_dim"]) == sizes[0]]
    last = [r for r in shaped if int(r["input_dim"]) == sizes[-1]]
    unbiased = sum(abs(float(r["pruning_gap"])) <= float(r["pruning_gap_ci"]) for r in last)
    quiet = [r for r in slopes if float(r["noise"]) == 0.0 and (
        r["method"] == "importance_node"
        or (r["method"].endswith("_node") and r["reweighting"] == "1"))]
    flat = sum(float(r["training_slope"]) > -0.2 for r in quiet)
    sim = {(r["input_dim"], r["noise"], r["reweighting"], r["nodes_equivalent"]):
           float(r["simulated"]) for r in gaps if r["method"] == "importance_edge"}
    refit = max(abs(v / sim[(n, s, "0", k)] - 1) for (n, s, rw, k), v in sim.items() if rw == "1")
    def span2(values):
        low, high = f"{min(values):.2f}", f"{max(values):.2f}"
        return low if low == high else f"{low}–{high}"

    k_first, k_middle, k_last = (span2(kurtosis_at(n)) for n in (sizes[0], 500, sizes[-1]))
    gram = table("finite_size", "gram_identity")
    moved = [max(abs(float(r["relative"])) for r in gram if int(r["input_dim"]) == n)
             for n in (sizes[0], sizes[-1])]
    moved = [f"{100 * x:.2g}%" for x in moved]
    return (
        f"At σ = 0.25 the rms gap falls with N in all {len(noisy)} settings (method, budget, "
        f"reweighting): median slope {signed(median)}, {about_root} of the {len(noisy)} "
        f"between −0.7 and −0.3",
        f"random_edge's pruning part falls at slopes {signed(min(random_edge))} to "
        f"{signed(max(random_edge))}",
        f"at most {100 * node_part:.2g}% (rms) at every size",
        f"from {pcts(first)} at N = {sizes[0]} to "
        f"{pcts([float(r['gap_rms']) for r in last])} at N = {sizes[-1]}",
        f"within its 95% interval of zero in {unbiased} of the {len(last)} settings",
        f"in {flat} of these {len(quiet)} settings its slope is above −0.2",
        f"importance_edge (whose mask is exact) moves by at most {100 * refit:.2g}%",
        f"{k_first} at N = {sizes[0]} (sampling alone: {sampling_at(sizes[0])}) to {k_last} at "
        f"N = {sizes[-1]} ({sampling_at(sizes[-1])})",
        f"at N = 500 ({k_middle} against {sampling_at(500)})",
        f"differs by at most {moved[0]} at N = {sizes[0]} and {moved[1]} at N = {sizes[-1]}")


def markdown_rows(path, first):
    """The cells of each row of a Markdown table in `path` whose first cell starts `first`."""
    with open(os.path.join(ROOT, path)) as f:
        return [[c.strip() for c in line.strip().strip("|").split("|")] for line in f
                if line.startswith("| " + first)]


def grid_benchmark():
    """docs/speed.md's grid table and profile figures, from the benchmarks' latest reports."""
    (base,), (this,) = (markdown_rows("benchmarks/grid_results.md", who)
                        for who in ("baseline", "this"))
    commit = base[1].split()[0]
    table = (f"| | previous release ({commit}) | this release | ratio | "
             f"|---|---|---|---| "
             f"| wall time | {base[2]} | {this[2]} | {this[7]} | "
             f"| CPU use | {base[3]} | {this[3]} | | "
             f"| CPU seconds | {base[4]} | {this[4]} | | "
             f"| peak memory (one process) | {base[5]} | {this[5]} | | "
             f"| run folder on disk | {base[6]} | {this[6]} | |")

    def phase(name):
        (row,) = markdown_rows("benchmarks/profile_results.md", name + " |")
        return " → ".join(f"{x:.1f} s" if x >= 0.1 else f"{x:.2f} s"
                          for x in (float(row[1]), float(row[2])))
    return (table,
            f"a data set {phase('data set (teacher, 800,000 + 80,000 samples, Gram, 2 students)')}",
            f"the K = 6 expectation group {phase('expectation group K = 6')} and the K = 20 one "
            f"{phase('expectation group K = 20')}",
            f"dpp_edge k = 250 {phase('cell K = 6 dpp_edge k = 250')}",
            f"importance_edge {phase('cell K = 6 importance_edge k = 250')}")


PHRASES = {
    "docs/claims.md": (k6_dpp_beats_random, k6_reweighted_gain, k20_dpp_loses,
                       dpp_edge_against_random_and_importance, dpp_edge_below_dpp_node,
                       random_edge_above_dpp_node, reweighting_node_methods, specialisation,
                       theory_against_expected),
    "README.md": (width_at_zero_noise,),
    "docs/theory.md": (finite_size_findings,),
    "docs/speed.md": (grid_benchmark,),
    "docs/variants.md": (unpruned_as_trained_and_rescaled, rescaling_lowers_losses,
                         k20_larger_teacher),
}


@pytest.mark.parametrize("name, phrase", [(name, phrase) for name, phrases in PHRASES.items()
                                          for phrase in phrases],
                         ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_the_docs_quote_the_committed_runs(name, phrase):
    found = phrase()
    for expected in (found,) if isinstance(found, str) else found:
        assert expected in page(name), f"{name} should read: ...{expected}..."
