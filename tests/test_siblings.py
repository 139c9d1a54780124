"""The three training scripts are siblings: apart from their module docstring and the parts each marks as its
objective (between "# objective:" and "# end of objective" comments), they are the same file. A change to the
scaffolding of one must be made in all, or this test fails."""

import ast
import os
import re

import pytest

from helpers import ROOT

SCRIPTS = ["ncp_dpo.py", "ncp_cpo.py", "ncp_sft.py"]
BEGIN = re.compile(r"^\s*# objective: ")
END = re.compile(r"^\s*# end of objective\s*$")


def scaffolding(script):
    """The script's lines without its module docstring and its marked objective parts (each left as one line)."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant), f"{script}: no docstring"
    lines, kept, inside, regions = source.splitlines()[docstring.end_lineno:], [], False, 0
    for number, line in enumerate(lines, docstring.end_lineno + 1):
        if BEGIN.match(line):
            assert not inside, f"{script}:{number}: an objective part opens inside another"
            inside, regions = True, regions + 1
            kept.append(line[:len(line) - len(line.lstrip())] + "# objective")
        elif END.match(line):
            assert inside, f"{script}:{number}: an objective part closes that was not open"
            inside = False
        elif not inside:
            kept.append(line)
    assert not inside, f"{script}: an objective part is never closed"
    return kept, regions


def test_markers_are_well_formed_and_the_same_in_number():
    counts = {script: scaffolding(script)[1] for script in SCRIPTS}
    assert set(counts.values()) == {3}, counts  # the loss, its flags, its forward block


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_scaffolding_is_identical(script):
    reference, _ = scaffolding(SCRIPTS[0])
    lines, _ = scaffolding(script)
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(reference, lines)) if a != b]
    assert not diff and len(lines) == len(reference), (
        f"{script} differs from {SCRIPTS[0]} outside the objective parts; first: {diff[:3]} "
        f"(lengths {len(lines)} / {len(reference)})")


def test_the_check_catches_a_drift(tmp_path, monkeypatch):
    """The comparison is not vacuous: one changed scaffolding line is found."""
    reference, _ = scaffolding(SCRIPTS[0])
    with open(os.path.join(ROOT, SCRIPTS[1])) as f:
        source = f.read()
    drifted = source.replace("clip_grad_norm_(lora_params, 1.0)", "clip_grad_norm_(lora_params, 2.0)")
    assert drifted != source
    (tmp_path / SCRIPTS[1]).write_text(drifted)
    monkeypatch.setattr("test_siblings.ROOT", str(tmp_path))
    lines, _ = scaffolding(SCRIPTS[1])
    assert lines != reference and sum(a != b for a, b in zip(lines, reference)) == 1
