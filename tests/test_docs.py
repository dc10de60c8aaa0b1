"""The documentation: the README is a user guide whose first screen holds the install, the workflow
and the demo; design notes, results, reliability and testing records live in docs/; every
documentation path the README, the code, the tests and docs/ cite exists; nothing cites a folder
outside the repository."""
import glob
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
CODE_DIRS = ("nnunet_gemini", "trainers", "pretraining", "tests", "benchmarks", ".ci")
MAX_README_LINES = 260
# a path that starts with docs/ (not part of a URL or a longer path such as .../docs/...)
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./{},*-]*[\w/}*]")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
OUTSIDE = ("../" + "shared", "gemini" + "-method.md")  # split so that this file does not cite them


def _readme_lines():
    return open(README, encoding="utf-8").read().split("\n")


def _cited_files():
    """README.md, every .py / .md / .sh of the code folders (tests and benchmarks included), docs/**/*.md."""
    files = [README, os.path.join(REPO_ROOT, "setup.py")]
    for folder in CODE_DIRS:
        for ext in ("py", "md", "sh"):
            files += glob.glob(os.path.join(REPO_ROOT, folder, "**", f"*.{ext}"), recursive=True)
    files += glob.glob(os.path.join(REPO_ROOT, ".ci", "*"))
    files += glob.glob(os.path.join(REPO_ROOT, "docs", "**", "*.md"), recursive=True)
    out = os.path.join(REPO_ROOT, "benchmarks", "out") + os.sep  # git-ignored benchmark output
    return sorted({f for f in files if os.path.isfile(f) and not f.startswith(out)})


def _expand(path: str):
    """One path per alternative of a brace group: results.{md,png} -> results.md, results.png."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [path[:m.start()] + alt + path[m.end():] for alt in m.group(1).split(",")]


def test_readme_is_a_short_user_guide_with_install_workflow_and_demo_first():
    lines = _readme_lines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    first = "\n".join(lines[:40])
    for needed in ("<!-- test-command -->", "<!-- /test-command -->", "imagesUnlabeled", "nnUNetv2_plan_and_preprocess",
                   "gemini_pretrain", "nnUNetv2_train", "-tr nnUNetTrainerGEMINI", "nnUNetv2_predict", "gemini_demo"):
        assert needed in first, f"{needed!r} is not in README.md's first 40 lines"


def test_readme_keeps_no_design_reliability_or_testing_section():
    headings = [line for line in _readme_lines() if line.startswith("#")]
    bad = [h for h in headings if re.match(r"#+\s*(Design choices|Reliability|Testing)\b", h)]
    assert bad == [], f"README.md sections that belong in docs/: {bad}"
    assert any(h.strip() == "## Results" for h in headings)


def test_every_cited_documentation_path_exists():
    missing = []
    for path in _cited_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        for cited in DOCS_PATH.findall(text):
            for candidate in _expand(cited.rstrip(".,:;")):
                if "*" in candidate:
                    ok = bool(glob.glob(os.path.join(REPO_ROOT, candidate)))
                else:
                    ok = os.path.exists(os.path.join(REPO_ROOT, candidate))
                if not ok:
                    missing.append(f"{os.path.relpath(path, REPO_ROOT)}: {candidate}")
    assert missing == [], missing


def test_markdown_links_resolve():
    missing = []
    for path in [README] + glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")):
        for target in MD_LINK.findall(open(path, encoding="utf-8").read()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                missing.append(f"{os.path.relpath(path, REPO_ROOT)}: {target}")
    assert missing == [], missing


def test_nothing_cites_a_folder_outside_the_repository():
    offenders = []
    for path in _cited_files():
        for number, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
            offenders += [f"{os.path.relpath(path, REPO_ROOT)}:{number}: {o}" for o in OUTSIDE if o in line]
    assert offenders == [], offenders


def test_docs_hold_what_moved_out_of_the_readme():
    for name, needed in {"design.md": ("MONAI", "Local NCC by box filter"),
                         "results.md": ("## Real-data study (hippocampus MRI)", "GPU, cut-down standard budget"),
                         "reliability.md": ("## Bad input", "## Faults", "## Safe loading"),
                         "testing.md": ("pytest -q",),
                         "method.md": ("1.0", "0.8", "0.4", "align_corners", "nnUNet_gemini_deformer_lr")}.items():
        text = open(os.path.join(REPO_ROOT, "docs", name), encoding="utf-8").read()
        for item in needed:
            assert item in text, f"{name} in docs lacks {item!r}"


def test_readme_options_table_lists_every_trainer_option():
    from dataclasses import fields

    from nnunet_gemini.trainers.options import PREFIX, GeminiRunOptions
    text = open(README, encoding="utf-8").read()
    missing = [PREFIX + f.name for f in fields(GeminiRunOptions) if f"`{PREFIX}{f.name}`" not in text]
    assert missing == [], f"README.md's Options table lacks {missing}"


def test_readme_lists_every_gemini_pretrain_flag():
    from nnunet_gemini.pretraining.run_pretraining import build_parser
    text = open(README, encoding="utf-8").read()
    flags = [s for a in build_parser()._actions for s in a.option_strings if s not in ("-h", "--help")]
    missing = [f for f in flags if f"`{f}`" not in text and f"`{f} " not in text]
    assert missing == [], f"README.md's gemini_pretrain table lacks {missing}"
