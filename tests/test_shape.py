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


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_line_budgets(script):
    paper, appendix = split(script)
    paper_max, total_max = BUDGETS[script]
    assert len(paper) <= paper_max, f"{script}: the paper part is {len(paper)} lines, budget {paper_max}"
    total = len(paper) + 1 + len(appendix)
    assert total <= total_max, f"{script}: {total} lines, budget {total_max}"
