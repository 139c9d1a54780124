"""The trainers read as their method: the loss and the errors near the top, a short main() in which the loop's
forward, loss, backward and step stand, and the scaffolding once, in run.py, which never asks which objective it
serves."""

import ast
import os

import pytest

from helpers import ROOT

TRAINERS = {"ncp_dpo.py": "dpo_loss", "ncp_cpo.py": "cpo_loss", "ncp_sft.py": "sft_loss"}


def tree(name):
    with open(os.path.join(ROOT, name)) as f:
        source = f.read()
    return source, ast.parse(source)


def functions(module):
    return {node.name: node for node in module.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("script", TRAINERS)
def test_a_trainer_is_its_method_first(script):
    source, module = tree(script)
    defs = functions(module)
    assert len(source.splitlines()) <= 300
    assert defs[TRAINERS[script]].end_lineno <= 100 and defs["errors"].end_lineno <= 100  # the method first
    main = defs["main"]
    assert main.end_lineno - main.lineno + 1 <= 100
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
             for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))}
    assert {"errors", "backward", "optimizer_step", TRAINERS[script]} <= calls, calls  # forward, loss, backward, step


def test_the_trainers_together_and_run_py_asks_no_objective():
    assert sum(len(tree(name)[0].splitlines()) for name in [*TRAINERS, "spo.py"]) <= 1700
    _, module = tree("run.py")
    names = {"dpo", "cpo", "sft", "spo"}
    assert not [node.value for node in ast.walk(module) if isinstance(node, ast.Constant) and node.value in names]
