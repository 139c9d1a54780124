"""The README and docs/ are what a user runs: every relative link (and its #anchor) resolves, and every `python` or
`torchrun` command, in a code block or inline, names a script that exists and only flags its --help lists."""

import concurrent.futures
import functools
import glob
import os
import re
import shlex
import sys

import pytest

import launch
from helpers import ROOT, env

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def anchors(page):
    """GitHub's heading ids: lower case, punctuation but - and _ dropped, spaces to -."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in read(page).splitlines() if line.startswith("#") and not line.startswith("#!")}


def outside_code(text):
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_there_are_docs_and_the_readme_is_short():
    assert len(PAGES) >= 7 and len(read("README.md").splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(outside_code(read(page))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(target)
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page}: {broken}"


def commands(page):
    """(script, [flags]) of every python / torchrun command of a page: code blocks (continuation lines joined,
    comments dropped) and inline code spans."""
    text = read(page)
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += block.replace("\\\n", " ").splitlines()
    found += re.findall(r"`((?:python|torchrun) [^`]+)`", " ".join(outside_code(text).split()))
    out = []
    for line in found:
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                words = part.split()
            if not words or words[0] not in ("python", "torchrun"):
                continue
            script = next((w for w in words if w.endswith(".py")), None)
            if script is None:
                continue  # python -m pytest, python -c ...
            rest = words[words.index(script) + 1:]
            rest = rest[:rest.index("--")] if "--" in rest else rest  # after --: another script's flags
            out.append((script, sorted({w.split("=")[0] for w in rest if w.startswith("--")})))
    return out


@functools.lru_cache(maxsize=None)
def help_flags(scripts):
    def one(script):
        proc = launch.python([sys.executable, os.path.join(ROOT, script), "--help"], env(), ROOT, 300, merge=False)
        assert proc.returncode == 0, f"{script} --help: {proc.stderr[-2000:]}"
        return script, set(re.findall(r"--[a-z0-9][a-z0-9-]*", proc.stdout))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, scripts))


def test_every_command_names_a_script_and_flags_that_exist():
    every = [(page, script, flags) for page in PAGES for script, flags in commands(page)]
    assert len(every) > 40  # the parser finds the commands it is meant to check
    missing = [(page, script) for page, script, _ in every if not os.path.isfile(os.path.join(ROOT, script))]
    assert not missing, missing
    known = help_flags(tuple(sorted({script for _, script, _ in every})))
    unknown = [(page, script, flag) for page, script, flags in every for flag in flags
               if flag not in known[script]]
    assert not unknown, unknown


def test_the_checks_catch_a_bad_link_and_a_bad_flag(tmp_path, monkeypatch):
    """Neither check is vacuous: a link to a missing anchor and an unknown flag are found."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n[x](../README.md#no-such-heading) [y](a.md#title)\n")
    (tmp_path / "README.md").write_text("# Read me\n\n```bash\npython ncp_dpo.py --model tiny \\\n  --no-such-flag 1\n"
                                        "```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    with pytest.raises(AssertionError, match="no-such-heading"):
        test_every_relative_link_resolves("docs/a.md")
    assert commands("README.md") == [("ncp_dpo.py", ["--model", "--no-such-flag"])]


CODE = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


def pointers(text):
    """The pointers to the docs in code (messages, --help, comments): ("README", section) for "the README's X
    section" and "(README, X)", ("docs/x.md", None) for a docs page, and ("README", None) for a bare README."""
    found = [("README", m.group(1)) for m in re.finditer(r"README's ([A-Z][\w .&-]*?) section", text)]
    found += [("README", m.group(1)) for m in re.finditer(r"\(README, ([A-Z][\w .&-]*?)\)", text)]
    found += [(m.group(0), None) for m in re.finditer(r"docs/[\w-]+\.md", text)]
    bare = re.sub(r"README's [A-Z][\w .&-]*? section|\(README, [A-Z][\w .&-]*?\)|README\.(json|md)", "", text)
    return found + [("README", None)] * len(re.findall(r"\bREADME\b", bare))


def unresolved(text, root):
    headings = [line.lstrip("#").strip() for line in open(os.path.join(root, "README.md")) if line.startswith("#")]
    bad = []
    for target, section in pointers(text):
        if target.startswith("docs/") and not os.path.isfile(os.path.join(root, target)):
            bad.append(target)
        elif target == "README" and (section is None or not any(h.startswith(section) for h in headings)):
            bad.append(f"README: {section or 'no section named'}")
    return bad


def test_every_pointer_to_the_docs_in_the_code_resolves():
    """A message or --help that sends the user to a README section or a docs page finds it there."""
    bad = {os.path.relpath(path, ROOT): unresolved(open(path).read(), ROOT) for path in CODE}
    assert not {k: v for k, v in bad.items() if v}, bad
    assert sum(len(pointers(open(path).read())) for path in CODE) > 5  # the scan sees the pointers there are
    stale = "see the README's Getting the data section; (README); docs/nothing.md; (README, Limits)"
    assert unresolved(stale, ROOT) == ["README: Getting the data", "docs/nothing.md", "README: no section named"]
