"""Every `# SHARED: name` block is closed by its own `# END SHARED`, and is textually identical in every script that
carries it (STYLE.md: the appendices of two scripts diff to nothing)."""

import re
from collections import defaultdict

from conftest import ROOT

SCRIPTS = ["empssl_cifar.py", "swav_imagenet.py", "groco_imagenet.py", "slimclr_moco.py", "tec_mae.py"]


def shared_blocks(path) -> dict:
    """name -> text of each block of one script; a block opened inside another, a banner inside a block, a block
    never closed, an END without a block, or a name used twice is an AssertionError naming the line."""
    blocks, name, start, body = {}, None, 0, []
    for n, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        opened = re.match(r"\s*# SHARED:\s*(\S.*?)\s*$", line)
        closed = re.match(r"\s*# END SHARED\s*$", line)
        if opened or re.match(r"# ====", line):
            assert name is None, f"{path.name}:{n}: block '{name}' (line {start}) is not closed before this line"
        if opened:
            name, start, body = opened.group(1), n, []
            assert name not in blocks, f"{path.name}:{n}: a second block '{name}'"
        elif closed:
            assert name is not None, f"{path.name}:{n}: END SHARED without an open block"
            blocks[name], name = "".join(body), None
        elif name is not None:
            body.append(line)
    assert name is None, f"{path.name}: block '{name}' (line {start}) is never closed"
    return blocks


def test_shared_blocks_are_closed_and_identical():
    by_name = defaultdict(dict)
    for script in SCRIPTS:
        for name, text in shared_blocks(ROOT / script).items():
            by_name[name][script] = text
    for script in SCRIPTS:  # not vacuous: every script shares its data, k-NN, DDP, checks and run machinery
        assert sum(len(texts[script].splitlines()) for texts in by_name.values() if script in texts) > 300, script
    for name, texts in by_name.items():
        first = next(iter(texts))
        for script, text in texts.items():
            assert text == texts[first], f"SHARED block '{name}' differs between {first} and {script}"
