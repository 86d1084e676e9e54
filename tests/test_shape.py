"""Every script reads method first (STYLE.md section 1): the paper part, then one banner, then only `# SHARED:` blocks,
within the line budgets."""

import re

import pytest

from conftest import ROOT

BANNER = "# ==== SHARED APPENDIX: identical in every script ===="
SECTIONS = ["ARGS", "VIEWS", "MODEL", "LOSS", "OPTIMIZER & SCHEDULES", "TRAIN STEP", "TRAINING", "MAIN"]
# (paper part, whole file): STYLE.md section 0
BUDGETS = {
    "empssl_cifar.py": (550, 950),
    "swav_imagenet.py": (550, 1250),
    "groco_imagenet.py": (550, 1250),
    "slimclr_moco.py": (750, 1500),
    "tec_mae.py": (850, 1700),
}


def split(script: str) -> tuple:
    lines = (ROOT / script).read_text().splitlines()
    assert lines.count(BANNER) == 1, f"{script}: the appendix banner must appear exactly once"
    at = lines.index(BANNER)
    return lines[:at], lines[at + 1 :]


def paper_lines(script: str) -> int:
    """STYLE.md's count: the lines before the first `# SHARED:` marker that is not an Args group."""
    lines = (ROOT / script).read_text().splitlines()
    return next(n for n, line in enumerate(lines) if re.match(r"# SHARED: (?!args-)", line))


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_paper_part_first_then_only_shared_blocks(script):
    paper, appendix = split(script)
    for n, line in enumerate(paper, 1):  # only the Args groups are shared inside the paper part
        m = re.match(r"\s*# SHARED: (\S+)", line)
        assert not m or m.group(1).startswith("args-"), f"{script}:{n}: shared block '{m.group(1)}' before the banner"
    banners = [m.group(1) for m in (re.match(r"# ==== \d+\. (.+?) ====$", line) for line in paper) if m]
    assert banners == SECTIONS, f"{script}: the paper part's sections are {banners}, not {SECTIONS}"
    inside, tail = False, []
    for n, line in enumerate(appendix, len(paper) + 2):
        if re.match(r"# SHARED: ", line):
            inside, tail = True, []
        elif line == "# END SHARED":
            inside = False
        elif not inside and line.strip():
            tail.append(line)
    assert tail == ['if __name__ == "__main__":', "    main(parse_args())"], (
        f"{script}: code outside the blocks: {tail}"
    )


# Over budget today (left so by issue 14; README "How a script reads" says why): each is held at its current size, so a
# change may not grow it, and once its budget is met the test fails until the entry is removed here.
OVER = {
    ("empssl_cifar.py", "total"): 1179,
    ("swav_imagenet.py", "total"): 1458,
    ("groco_imagenet.py", "total"): 1454,
    ("slimclr_moco.py", "paper"): 1078,
    ("slimclr_moco.py", "total"): 1844,
    ("tec_mae.py", "paper"): 1021,
    ("tec_mae.py", "total"): 1840,
}


@pytest.mark.parametrize("part", ["paper", "total"])
@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_line_budgets(script, part):
    n = paper_lines(script) if part == "paper" else len((ROOT / script).read_text().splitlines())
    budget = BUDGETS[script][part == "total"]
    if (script, part) not in OVER:
        assert n <= budget, f"{script}: the {part} is {n} lines, budget {budget}"
        return
    assert n <= OVER[script, part], f"{script}: the {part} grew to {n} lines (held at {OVER[script, part]})"
    if n > budget:
        pytest.xfail(f"{script}: the {part} is {n} lines, budget {budget}")
    pytest.fail(f"{script}: the {part} ({n} lines) is within its budget {budget} now: remove it from OVER")


def test_lines_within_120_characters():
    """The project's line length (ruff format --line-length 120), for code, tests and common/ alike."""
    files = sorted(BUDGETS) + [str(p.relative_to(ROOT)) for p in [*ROOT.glob("common/*.py"), *ROOT.glob("tests/*.py")]]
    long = [
        f"{f}:{n}" for f in files for n, line in enumerate((ROOT / f).read_text().splitlines(), 1) if len(line) > 120
    ]
    assert not long, f"lines over 120 characters: {long}"
