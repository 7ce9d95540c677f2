"""What the tests compare run folders by: the tables a study writes, byte for byte."""
import os

TABLES = ("results.csv", "expectations.csv", "specialisation.csv", "theory.csv", "claims.csv",
          "claims.md")


def assert_same_tables(out, reference, tables=TABLES):
    """Every table of run folder `out` is the same bytes as in `reference`."""
    for name in tables:
        with open(os.path.join(out, name), "rb") as a, \
                open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), f"{name} of {out} differs from {reference}"
