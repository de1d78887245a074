"""README.md and docs/*.md stay true: every relative link and #anchor resolves, every shell command in a code block
is run by a test or marked as needing a GPU, the network or long hours, and every config key, config file and
repository path they name exists. Pure parsing (no run); the negative cases prove each checker catches breakage.

Marking convention (docs/design.md, "Documentation"): an HTML comment on the line just before a code block,
`<!-- cmd: gpu -->`, `<!-- cmd: network -->`, `<!-- cmd: long -->` or several (`<!-- cmd: gpu, network, long -->`),
says why the suite does not run that block's commands. A test that runs a documented command (at tiny size where
it says so) declares it with `@runs_documented_command("...")` from conftest; this file reads those declarations
from the test sources, so an unmarked command that no test declares fails here."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKS = {"gpu", "network", "long", "cluster"}
SHELL = {"bash", "sh", "shell", "console"}
PROGRAM_WORDS = ("python ", "python3 ", "bash ", "torchrun ", "pip ", "$ ")
EXTENSIONS = {"py", "yaml", "yml", "json", "jsonl", "md", "pt", "pth", "npy", "npz", "png", "lock", "safetensors",
              "txt", "u8", "sh", "tar", "gz", "zip"}
# Repository-looking paths that name another project's files (mdistiller's configs, PaddleClas's, ...).
EXTERNAL_PATHS = ("configs/imagenet/", "mdistiller/", "ppcls/", "tools/", "lib/")
# Dotted names in the docs that look like keys but are not: the example method of extending.md's code block.
NOT_KEYS = ("kd.mine",)


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markdown punctuation and every character that is not a letter,
    digit, space, hyphen or underscore dropped, spaces to hyphens (so `A → B` gives `a--b`)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def prose_lines(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    fence = False
    for number, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            yield number, line


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(text):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def without_code_spans(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside code."""
    return [(number, target) for number, line in prose_lines(text)
            for target in re.findall(r"\]\(([^)\s]+)\)", without_code_spans(line))]


def link_problems(page: Path, text: str, read=lambda p: p.read_text()) -> list[str]:
    """Links of `text` (a page at `page`) whose file or #anchor does not exist."""
    problems = []
    for number, target in links(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if file_part and not path.exists():
            problems.append(f"{page.name}:{number}: link to a missing file: {target}")
            continue
        if anchor:
            if path.suffix != ".md":
                problems.append(f"{page.name}:{number}: an anchor into a file that is not markdown: {target}")
            elif anchor not in anchors(text if path == page else read(path)):
                problems.append(f"{page.name}:{number}: no heading gives the anchor #{anchor}: {target}")
    return problems


def code_blocks(text: str) -> list[dict]:
    """Fenced blocks: language, the marks of a `<!-- cmd: ... -->` line just before the fence, body, line."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            before = lines[start - 1].strip() if start else ""
            m = re.fullmatch(r"<!--\s*cmd:\s*(.*?)\s*-->", before)
            marks = {w.strip() for w in m.group(1).split(",")} if m else set()
            blocks.append({"lang": lang, "marks": marks, "body": lines[start + 1:j], "line": start + 1})
            i = j + 1
        else:
            i += 1
    return blocks


def is_command_block(block: dict) -> bool:
    """A shell block, or an unlabelled block whose lines start like commands (not a block of program output)."""
    if block["lang"] in SHELL:
        return True
    return block["lang"] == "" and any(line.startswith(PROGRAM_WORDS) for line in block["body"])


def commands(body: list[str]) -> list[str]:
    """The commands of a block: continuation lines joined, comments and prompts dropped, `&&` parts split,
    whitespace collapsed."""
    joined, current = [], ""
    for line in body:
        line = re.sub(r"(^|\s)#\s.*$|^#.*$", "", line).rstrip()  # a comment line, or a trailing `# ...`
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    out = []
    for command in joined:
        command = re.sub(r"^\$\s+", "", command.strip())
        for part in command.split("&&"):
            part = " ".join(part.split())
            if part:
                out.append(part)
    return out


def normalise(command: str) -> str:
    return " ".join(command.split())


def declared_commands(sources: dict[str, str]) -> dict[str, str]:
    """command -> "file::test" from `@runs_documented_command("...", ...)` decorators in test sources."""
    found = {}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                for deco in node.decorator_list:
                    if (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "runs_documented_command"):
                        for arg in deco.args:
                            found[normalise(ast.literal_eval(arg))] = f"{name}::{node.name}"
    return found


def command_problems(name: str, text: str, declared: dict[str, str]) -> list[str]:
    """Unmarked commands that no test declares, and marks that are not gpu, network or long."""
    problems = []
    for block in code_blocks(text):
        if not is_command_block(block):
            continue
        unknown = block["marks"] - MARKS
        if unknown:
            problems.append(f"{name}:{block['line']}: unknown mark(s) {sorted(unknown)}; use {sorted(MARKS)}")
        for command in commands(block["body"]):
            if command not in declared and not block["marks"]:
                problems.append(f"{name}:{block['line']}: no test runs `{command}` and its block is not marked "
                                "<!-- cmd: gpu|network|long -->")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Keys and paths
# ---------------------------------------------------------------------------------------------------------------
PROGRAMS = {"train_student.py": "train_student", "train_student_rl.py": "train_student_rl",
            "gan_vae.continual": "gan_vae", "gan_vae": "gan_vae"}


# Run in a subprocess: importing the example plugins registers their entries in this process's registries, whose
# listings (--help, the configuration tables) other tests in the same worker compare with the built-in ones.
_SCHEMA_KEYS = """
import json, sys
from pathlib import Path
from common import plugins
from common.config import iter_schema
from common.registry import compose_schema, plugin_scope
from engine.rl_schema import RLConfig
from engine.schema import Config
from gan_vae.continual import ContinualConfig
items = [str(p) for p in sorted(Path("examples/plugins").resolve().glob("*.py"))]
plugins.load(items)
with plugin_scope(plugins.keys(items)):
    print(json.dumps({name: [key for key, *_ in iter_schema(compose_schema(schema))]
                      for name, schema in [("train_student", Config), ("train_student_rl", RLConfig),
                                           ("gan_vae", ContinualConfig)]}))
"""


@lru_cache(maxsize=None)
def schema_keys() -> dict[str, frozenset[str]]:
    """Every key `--help` lists, per program, with the example plugins' entries in scope (the docs use them)."""
    proc = subprocess.run([sys.executable, "-c", _SCHEMA_KEYS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: frozenset(keys) for name, keys in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def key_tokens(text: str, sections: set[str]) -> list[tuple[int, str]]:
    """(line, key) of dotted config keys named in inline code of the prose and in command blocks' arguments."""
    pattern = re.compile(r"(?<![\w./<\-])([a-z_]+(?:\.(?:[a-z0-9_]+|\*|<[a-z]+>))+)(?![\w(])")
    found = []
    spans = [(n, span) for n, line in prose_lines(text) for span in re.findall(r"`([^`]+)`", line)]
    for block in code_blocks(text):
        if is_command_block(block):
            spans += [(block["line"], c) for c in commands(block["body"])]
    for number, span in spans:
        for token in pattern.findall(span):
            head, _, last = token.rpartition(".")
            if token.split(".")[0] not in sections or last in EXTENSIONS or "<" in token:
                continue
            found.append((number, token))
    return found


def key_problems(name: str, text: str, keys: frozenset[str]) -> list[str]:
    sections = {k.split(".")[0] for k in keys}
    problems = []
    for number, token in key_tokens(text, sections):
        if token.startswith(NOT_KEYS):
            continue
        if "*" in token:
            ok = any(k.startswith(token.split("*")[0]) for k in keys)
        else:  # a key, or a section (`kd.dkd`) that holds keys
            ok = token in keys or any(k.startswith(token + ".") for k in keys)
        if not ok:
            problems.append(f"{name}:{number}: `{token}` is not a config key of any program (see --help)")
    return problems


def command_key_problems(name: str, text: str, keys_of: dict[str, frozenset[str]]) -> list[str]:
    """Each `key=value` argument of a command exists in that program's schema."""
    problems = []
    for block in code_blocks(text):
        if not is_command_block(block):
            continue
        for command in commands(block["body"]):
            words = command.split()
            program = next((PROGRAMS[w] for w in words if w in PROGRAMS), None)
            if program is None or words[0] not in ("python", "torchrun"):
                continue
            for word in words:
                m = re.fullmatch(r"([a-z_]+(?:\.[a-z0-9_]+)+)=.*", word)
                if m and m.group(1) not in keys_of[program]:
                    problems.append(f"{name}:{block['line']}: `{m.group(1)}` is not a key of {program} "
                                    f"(`{command}`)")
    return problems


def path_tokens(text: str) -> list[tuple[int, str]]:
    """(line, path) of repository files named in inline code and in commands: configs/, scripts/, tests/, ...,
    and top-level programs."""
    pattern = re.compile(r"(?<![\w./-])((?:configs|scripts|examples|tests|engine|common|imagedata|gan_vae|docs)"
                         r"/[\w./-]+|[\w-]+\.(?:py|txt|yaml))(?:::(\w+))?")
    spans = [(n, span) for n, line in prose_lines(text) for span in re.findall(r"`([^`]+)`", line)]
    for block in code_blocks(text):
        if is_command_block(block):
            spans += [(block["line"], c) for c in commands(block["body"])]
    found = []
    for number, span in spans:
        for path, test in pattern.findall(span):
            path = path.rstrip(".")
            if path.startswith(EXTERNAL_PATHS) or "." not in Path(path).name:
                continue
            found.append((number, path + (f"::{test}" if test else "")))
    return found


def path_problems(name: str, text: str, root: Path = ROOT) -> list[str]:
    problems = []
    for number, token in path_tokens(text):
        path, _, test = token.partition("::")
        if "/" not in path and not (root / path).exists():
            continue  # a bare file name (`config.yaml`, `results.json`): a file of a run, not of the repository
        if not (root / path).exists():
            problems.append(f"{name}:{number}: no such file in the repository: {path}")
        elif test and not re.search(rf"^def {test}\(", (root / path).read_text(), re.M):
            problems.append(f"{name}:{number}: {path} has no test {test}")
    return problems


@lru_cache(maxsize=None)
def _declared() -> dict[str, str]:
    return declared_commands(_test_sources())


def _test_sources() -> dict[str, str]:
    return {f"tests/{p.name}": p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py"))}


# ---------------------------------------------------------------------------------------------------------------
# The docs as they are
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    assert link_problems(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_is_run_by_a_test_or_marked(page):
    assert command_problems(page.name, page.read_text(), _declared()) == []


def test_every_declared_command_is_documented_and_its_test_exists():
    documented = {c for page in PAGES for block in code_blocks(page.read_text()) if is_command_block(block)
                  for c in commands(block["body"])}
    declared = _declared()
    assert declared, "no test declares a documented command"
    for command, test in declared.items():
        assert command in documented, f"{test} declares `{command}`, which no page documents"
        path, _, name = test.partition("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_and_file_named_exists(page):
    keys_of = schema_keys()
    every_key = frozenset().union(*keys_of.values())
    text = page.read_text()
    assert key_problems(page.name, text, every_key) + command_key_problems(page.name, text, keys_of) \
        + path_problems(page.name, text) == []


def test_prose_lines_are_at_most_120_characters():
    long = [f"{page.name}:{n}" for page in PAGES for n, line in prose_lines(page.read_text())
            if len(line) > 120 and not line.startswith("|")]
    assert long == []


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    lines = text.split("\n")
    assert len(lines) <= 251
    first = "\n".join(lines[:60])
    for command in ("python train_student.py --config configs/quickstart.yaml",
                    "python train_student_rl.py --config configs/curriculum_synthetic.yaml",
                    "python -m gan_vae.continual --config configs/gan_vae_shared_data.yaml teacher.steps=100"):
        assert command in first, command
    # every docs page is in the README's map
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in text, page.name


# ---------------------------------------------------------------------------------------------------------------
# The checkers catch breakage (small synthetic pages)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heading, anchor", [
    ("The real run: ResNet-152 → MobileNetV2 on mini-ImageNet",
     "the-real-run-resnet-152--mobilenetv2-on-mini-imagenet"),
    ("Methods (`kd.method`)", "methods-kdmethod"),
    ("Continual generative learning on `../shared/data`: MNIST", "continual-generative-learning-on-shareddata-mnist"),
    ("FitNet and pooled_hint", "fitnet-and-pooled_hint"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


@pytest.mark.parametrize("text, fragment", [
    ("# A\n\nSee [b](#b).\n", "no heading gives the anchor #b"),
    ("# A\n\nSee [it](missing.md).\n", "link to a missing file"),
    ("# A\n\nSee [it](README.md#no-such-heading).\n", "no heading gives the anchor #no-such-heading"),
    ("# A\n\nSee [the code](common/config.py#L3).\n", "not markdown"),
])
def test_a_broken_link_is_caught(text, fragment):
    problems = link_problems(ROOT / "page.md", text)
    assert len(problems) == 1 and fragment in problems[0], problems


@pytest.mark.parametrize("text", [
    "# A\n\nSee [a](#a), [the changelog](CHANGELOG.md#changelog), [it](https://example.org#x).\n",
    "# A\n# A\n\n[second](#a-1) and `[not a link](#nowhere)`\n\n```\n[in code](#nowhere)\n```\n",
])
def test_a_good_link_passes(text):
    assert link_problems(ROOT / "page.md", text) == []


DECLARED = {"python train_student.py --config configs/quickstart.yaml": "tests/test_x.py::test_y"}


@pytest.mark.parametrize("text, fragment", [
    ("```bash\npython train_student.py --config configs/quickstart.yml\n```\n", "no test runs"),  # a typo
    ("```bash\npython train_student.py --config configs/quickstart.yaml train.epochs=1\n```\n", "no test runs"),
    ("```\npython bench.py\n```\n", "no test runs"),  # an unlabelled block of commands
    ("```console\n$ pip install -r requirements.txt && python train_student.py --config configs/quickstart.yaml\n```\n",
     "no test runs `pip install -r requirements.txt`"),
    ("<!-- cmd: slow -->\n```bash\npython bench.py\n```\n", "unknown mark"),
    ("<!-- cmd: gpu -->\n\n```bash\npython bench.py\n```\n", "no test runs"),  # the mark must touch the fence
])
def test_an_unmarked_command_no_test_runs_is_caught(text, fragment):
    problems = command_problems("page.md", text, DECLARED)
    assert problems and fragment in problems[0], problems


@pytest.mark.parametrize("text", [
    "```bash\npython train_student.py \\\n    --config configs/quickstart.yaml   # a comment\n```\n",
    "<!-- cmd: gpu, long -->\n```bash\ntorchrun --nproc_per_node=8 train_student.py\n```\n",
    "```\nsame budget, same seed: KD vs labels only\n| run | test/acc1 |\n```\n",  # output, not commands
    "```python\nimport torch\n```\n",
])
def test_a_run_or_marked_command_passes(text):
    assert command_problems("page.md", text, DECLARED) == []


def test_declarations_are_read_from_test_sources():
    source = ('from conftest import runs_documented_command\n\n'
              '@runs_documented_command("python  a.py  x=1", "python b.py")\ndef test_a():\n    pass\n')
    assert declared_commands({"tests/test_z.py": source}) == {"python a.py x=1": "tests/test_z.py::test_a",
                                                              "python b.py": "tests/test_z.py::test_a"}


KEYS = {"train_student": frozenset({"kd.method", "kd.dkd.alpha", "teacher.mode", "train.epochs"}),
        "train_student_rl": frozenset({"kd.method", "agent.name"}), "gan_vae": frozenset({"student.steps"})}


@pytest.mark.parametrize("text, fragment", [
    ("Set `kd.methd=dkd`.\n", "`kd.methd` is not a config key"),
    ("Set `teacher.mode=cached` and `kd.dkd.alpah`.\n", "`kd.dkd.alpah`"),
    ("Every `agent.ppo.*` key.\n", "`agent.ppo.*`"),
])
def test_an_unknown_key_is_caught(text, fragment):
    problems = key_problems("page.md", text, frozenset().union(*KEYS.values()))
    assert len(problems) == 1 and fragment in problems[0], problems


@pytest.mark.parametrize("text", [
    "Set `kd.method=dkd`, `kd.dkd.*`, `kd.dkd`, `kd.<name>.*`, `train/loss_kd`, `student.safetensors`, `run.json`.\n",
    "`models.difficulty_score` and `common.rng.rng_isolated()` are code, not keys.\n",
])
def test_known_keys_and_non_keys_pass(text):
    assert key_problems("page.md", text, frozenset().union(*KEYS.values())) == []


def test_a_command_with_another_programs_key_is_caught():
    text = ("<!-- cmd: long -->\n```bash\npython train_student.py agent.name=ppo\n"
            "python train_student_rl.py agent.name=ppo\n```\n")
    problems = command_key_problems("page.md", text, KEYS)
    assert len(problems) == 1 and "`agent.name` is not a key of train_student" in problems[0], problems


@pytest.mark.parametrize("text, fragment", [
    ("Run `python train_student.py --config configs/quickstart_typo.yaml`.\n", "configs/quickstart_typo.yaml"),
    ("<!-- cmd: long -->\n```bash\npython scripts/no_such_script.py\n```\n", "scripts/no_such_script.py"),
    ("Checked by `tests/test_docs.py::test_no_such_test`.\n", "has no test test_no_such_test"),
])
def test_a_missing_file_is_caught(text, fragment):
    problems = path_problems("page.md", text)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_existing_files_and_other_projects_paths_pass():
    text = ("`configs/quickstart.yaml`, `tests/test_docs.py::test_a_missing_file_is_caught`, mdistiller "
            "`configs/imagenet/r50_mv1/dkd.yaml`, `runs/x/student.safetensors`, `config.yaml`, `kd_methods.py`.\n")
    assert path_problems("page.md", text) == []
