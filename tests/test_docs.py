"""The user docs name only commands, options and config keys that exist, and document every config key.

Reads README.md and docs/*.md (not docs/experiments/: dated records of their time). The conventions it
checks are written in docs/development.md ("The docs test"):

- `lesionstack COMMAND --opt ...` in a code block or an inline code span: the command exists and each
  option on its line (with `\\` continuation lines) is one of that command's options;
- an inline code span of options alone (`--fp16`): some command has each option;
- a config key with its family first (`cnn.model.gate`): the family's dataclass has that path;
- `key: value` in an inline code span, and every key of a YAML code block: some config dataclass has it;
- docs/configuration.md's tables list every key of every family, with the dataclass's default.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_PAGE = REPO / "docs" / "configuration.md"
GLOBAL_OPTIONS = {"--debug", "--help"}  # `--debug` is taken anywhere on the line (cli.main)
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "html", "csv", "parquet", "png", "txt", "db", "md", "pt",
                 "safetensors", "onnx", "cbm", "hdf5", "jpg", "lock", "toml", "whl"}

# ---- what exists: the CLI and the config dataclasses ---------------------------------------------------


@cache
def cli_options() -> dict[str, frozenset[str]]:
    """Command name -> its option spellings today (long and short, secondary `--no-x` included)."""
    import typer.main

    from lesionstack.cli import app

    group = typer.main.get_command(app)
    common = {o for p in group.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    return {name: frozenset(common | GLOBAL_OPTIONS | {o for p in cmd.params
                                                        for o in (*p.opts, *p.secondary_opts) if o.startswith("-")})
            for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


@cache
def old_spellings() -> dict[str, dict[str, str]]:
    """Command -> {old option: what to write now}: the CLI still takes them with a deprecation notice, the
    docs show only today's spelling."""
    from lesionstack.cli.common import DATA_OPTIONS, RENAMED

    out: dict[str, dict[str, str]] = {name: dict(renames) for name, renames in RENAMED.items()}
    for name, flag in DATA_OPTIONS.items():
        out.setdefault(name, {})[flag] = "the positional DATA argument"
    return out


def _find_class(name: str, *modules: str) -> type:
    """A config dataclass by name: from its usual module, else from wherever a refactor moved it."""
    for module in modules:
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    import lesionstack

    for info in pkgutil.walk_packages(lesionstack.__path__, "lesionstack."):
        cls = getattr(importlib.import_module(info.name), name, None)
        if dataclasses.is_dataclass(cls):
            return cls  # type: ignore[return-value]
    raise LookupError(f"no config dataclass {name} in lesionstack")


@cache
def families() -> dict[str, type]:
    """Config family (how the docs prefix a key) -> its dataclass. The run config's sections are families."""
    run = _find_class("RunConfig", "lesionstack.run_config", "lesionstack.pipeline")
    hints = typing.get_type_hints(run)
    out: dict[str, type] = {"run": run}
    for f in dataclasses.fields(run):
        hint = _section(hints[f.name])
        if hint is not None:
            out[f.name] = hint
    out["distill"] = _find_class("DistillConfig", "lesionstack.train.distill_config", "lesionstack.train.distill")
    out["report"] = _find_class("ReportConfig", "lesionstack.report.build", "lesionstack.report")
    return out


def _section(hint: Any) -> type | None:
    """The dataclass of a field typed `X` or `X | None`, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _is_mapping(hint: Any) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return any((typing.get_origin(a) or a) is dict for a in args)


def resolves(cls: type, path: list[str]) -> bool:
    """Whether `a.b.c` is a key of `cls` (a free-form mapping field takes any sub-keys)."""
    hints = typing.get_type_hints(cls)
    head, rest = path[0], path[1:]
    if head not in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
        return False
    if not rest:
        return True
    section = _section(hints[head])
    if section is not None:
        return resolves(section, rest)
    return _is_mapping(hints[head])


LOADER_KEYS = {"base", "schema"}  # read by the YAML loader itself (inheritance, schema version), in any config


def key_exists(key: str, *, family_only: bool = False) -> bool:
    """`fam.path` in that family; otherwise (unless `family_only`) `path` from the root of any family."""
    parts = key.split(".")
    if parts[-1] in LOADER_KEYS and (len(parts) == 1 or key_exists(".".join(parts[:-1]), family_only=family_only)
                                     or parts[0] in families() and len(parts) == 2):
        return True
    fams = families()
    if parts[0] in fams and len(parts) > 1 and resolves(fams[parts[0]], parts[1:]):
        return True
    return not family_only and any(resolves(cls, parts) for cls in fams.values())


# ---- what the docs name ---------------------------------------------------------------------------------

FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"(?<![\w.-])lesionstack(?:\.cli)?[ \t]+([a-z][a-z0-9-]*)")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
PREFIXED = re.compile(r"^([a-z_]\w*(?:\.[a-z_]\w*)+)(?::\s.*)?$")
KEY_VALUE = re.compile(r"^([a-z_]\w*(?:\.[a-z_]\w*)*): (?:\S+|\[.*\]|\{.*\})$")  # a value, not a sentence


@dataclasses.dataclass(frozen=True)
class Mention:
    line: int
    kind: str  # command | options | prefixed | key_value | yaml
    text: str


def split_code(text: str) -> tuple[list[tuple[int, str, str]], str]:
    """(first line, language, body) of each code block (fenced or indented), and the text without them."""
    blocks: list[tuple[int, str, str]] = []
    prose = text
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        blocks.append((line, m.group(1), m.group(2)))
        prose = prose[:m.start()] + re.sub(r"[^\n]", " ", m.group(0)) + prose[m.end():]
    lines, out, previous_in_block = prose.split("\n"), [], False
    for i, line in enumerate(lines):
        indented = line.startswith("    ") and not line.lstrip().startswith(("- ", "* ", "|"))
        if indented and line.strip() and (previous_in_block or i == 0 or not lines[i - 1].strip()):
            if previous_in_block:
                first, lang, body = blocks.pop()
                blocks.append((first, lang, f"{body}\n{line}"))
            else:
                blocks.append((i + 1, "", line))
            out.append("")
            previous_in_block = True
        else:
            out.append(line)
            previous_in_block = False
    return blocks, "\n".join(out)


def command_lines(body: str) -> list[str]:
    """Lines of shell, a line ending in `\\` joined with the next."""
    return body.replace("\\\n", " ").split("\n")


def mentions(text: str) -> list[Mention]:
    blocks, prose = split_code(text)
    found: list[Mention] = []
    for first, lang, body in blocks:
        if lang in ("yaml", "yml"):
            found.append(Mention(first, "yaml", body))
            continue
        for offset, line in enumerate(command_lines(body)):
            found += [Mention(first + offset, "command", line[m.start():].split(" #")[0])
                      for m in COMMAND.finditer(line)]
    for m in _inline_spans(prose):
        span, line = " ".join(m.group(1).split()), prose.count("\n", 0, m.start()) + 1
        if COMMAND.search(span):
            found += [Mention(line, "command", span[c.start():]) for c in COMMAND.finditer(span)]
        elif span.startswith("--"):
            found.append(Mention(line, "options", span))
        elif PREFIXED.match(span) and PREFIXED.match(span).group(1).split(".")[0] in families():  # type: ignore[union-attr]
            found.append(Mention(line, "prefixed", PREFIXED.match(span).group(1)))  # type: ignore[union-attr]
        elif KEY_VALUE.match(span):
            found.append(Mention(line, "key_value", KEY_VALUE.match(span).group(1)))  # type: ignore[union-attr]
    return found


def _inline_spans(prose: str) -> list[re.Match[str]]:
    """Inline code spans, paired within each paragraph (a stray backtick cannot shift the rest)."""
    spans, start = [], 0
    for para in re.split(r"(\n[ \t]*\n)", prose):
        spans += [m for m in INLINE.finditer(prose, start, start + len(para))]
        start += len(para)
    return spans


def _option_problem(where: str, line: int, command: str, option: str) -> str:
    now = old_spellings().get(command, {}).get(option)
    if now is not None:
        return f"{where}:{line}: `lesionstack {command} {option}` is the old spelling: write {now}"
    return f"{where}:{line}: `lesionstack {command}` has no option {option}"


def yaml_keys(body: str) -> list[str]:
    data = yaml.safe_load(body) or {}

    def flat(d: dict[str, Any], prefix: str = "") -> list[str]:
        keys = []
        for k, v in d.items():
            keys.append(f"{prefix}{k}")
            if isinstance(v, dict):
                keys += flat(v, f"{prefix}{k}.")
        return keys

    return flat(data) if isinstance(data, dict) else []


def problems(text: str, where: str) -> list[str]:
    """Every command, option or key `text` names that does not exist, as `where:line: what`."""
    cmds, out = cli_options(), []
    all_options = frozenset().union(*cmds.values())
    for m in mentions(text):
        if m.kind == "command":
            words = re.split(r"\s*(?:\||;|&&|`)\s*", m.text)[0]
            name = COMMAND.match(words)
            if name is None:
                continue
            if name.group(1) not in cmds:
                out.append(f"{where}:{m.line}: no command `lesionstack {name.group(1)}`")
                continue
            out += [_option_problem(where, m.line, name.group(1), o)
                    for o in OPTION.findall(words[name.end():]) if o not in cmds[name.group(1)]]
        elif m.kind == "options":
            out += [f"{where}:{m.line}: no command has the option {o}"
                    for o in OPTION.findall(m.text) if o.startswith("--") and o not in all_options]
        elif m.kind == "prefixed" and m.text.split(".")[-1] not in FILE_SUFFIXES:
            if not key_exists(m.text, family_only=True):
                out.append(f"{where}:{m.line}: no config key `{m.text}`")
        elif m.kind == "key_value" and not key_exists(m.text):
            out.append(f"{where}:{m.line}: no config key `{m.text}` (in `{m.text}: ...`)")
        elif m.kind == "yaml":
            out += [f"{where}:{m.line + _key_line(m.text, k)}: no config key `{k}` (YAML block)"
                    for k in yaml_keys(m.text) if not key_exists(k)]
    return out


def _key_line(body: str, key: str) -> int:
    """The offset of the line that sets `key`'s last part in a YAML block (0 when not found)."""
    last = re.escape(key.split(".")[-1])
    return next((i for i, line in enumerate(body.split("\n")) if re.match(rf"\s*{last}\s*:", line)), 0)


# ---- what the configuration page must list ---------------------------------------------------------------


def documented_keys(cls: type, prefix: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Dotted key -> default of every leaf and section of `cls`, top-level names in `skip` left out."""
    from lesionstack.config import config_to_dict

    out: dict[str, Any] = {}
    hints, inst = typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        key, value, section = f"{prefix}.{f.name}", getattr(inst, f.name), _section(hints[f.name])
        out[key] = config_to_dict(value) if dataclasses.is_dataclass(value) else value
        if section is not None:
            out.update(documented_keys(section, key))
    return out


def expected_keys() -> dict[str, Any]:
    fams = families()
    run_sections = frozenset(k for k in fams if k not in ("run", "distill", "report"))
    cnn_fields = frozenset(f.name for f in dataclasses.fields(fams["cnn"]))  # type: ignore[arg-type]
    out = documented_keys(fams["run"], "run", run_sections)
    for name, cls in fams.items():
        if name == "run":
            continue
        skip = {"diagnosis": frozenset({"model", "augment"}), "segmenter": frozenset({"augment"}),
                "distill": cnn_fields}.get(name, frozenset())
        out.update(documented_keys(cls, name, skip))
    return out


ROW = re.compile(r"^\| `([\w.]+)` \| (.*?) \|", re.M)


def table_problems(page: str, expected: dict[str, Any]) -> list[str]:
    rows = {m.group(1): m.group(2).strip() for m in ROW.finditer(page)}
    out = [f"docs/configuration.md: the key `{k}` is not in its tables" for k in expected if k not in rows]
    for key, cell in rows.items():
        if key in expected and cell.startswith("`") and cell.endswith("`") and cell.count("`") == 2:
            default = expected[key]
            default = list(default) if isinstance(default, tuple) else default
            if yaml.safe_load(cell[1:-1]) != default:
                out.append(f"docs/configuration.md: `{key}` says default {cell}, the dataclass has {default!r}")
    return out


# ---- the tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_option_and_key_the_docs_name_exists(page):
    assert problems(page.read_text(), str(page.relative_to(REPO))) == []


def undocumented(commands: dict[str, frozenset[str]], primary: dict[str, frozenset[str]], text: str) -> list[str]:
    """Commands that no page shows as `lesionstack CMD`, and options (their main spelling) no page names."""
    out = [f"no docs page shows `lesionstack {c}`" for c in commands
           if not re.search(rf"lesionstack(?:\.cli)? {re.escape(c)}(?![\w-])", text)]
    return out + [f"no docs page names `{c} {o}`" for c, opts in primary.items() for o in sorted(opts)
                  if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]


@cache
def primary_options() -> dict[str, frozenset[str]]:
    """Command -> its options' first long spelling (not `--no-x` twins, not --help)."""
    import typer.main

    from lesionstack.cli import app

    group = typer.main.get_command(app)
    return {name: frozenset(next((o for o in p.opts if o.startswith("--")), p.opts[0]) for p in cmd.params
                            if p.param_type_name == "option" and p.name != "help")
            for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


def test_every_command_and_option_is_documented():
    text = "\n".join(page.read_text() for page in DOCS)
    assert undocumented(cli_options(), primary_options(), text) == []


def test_the_configuration_page_lists_every_key_with_its_default():
    assert table_problems(CONFIG_PAGE.read_text(), expected_keys()) == []


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(page: Path) -> list[str]:
    """Relative links whose file or heading anchor does not exist."""
    out = []
    for target in LINK.findall(INLINE.sub("", split_code(page.read_text())[1])):  # code shows, it does not link
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{page.name}: link to a missing file {target}")
        elif anchor and dest.is_file():
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in anchors:
                out.append(f"{page.name}: link to a missing heading {target}")
    return out


@pytest.mark.parametrize("page", DOCS + [REPO / "CHANGELOG.md", REPO / "docs" / "experiments" / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_exists(page):
    assert link_problems(page) == []


SOURCE = re.compile(r"(?<![\w/.-])([\w/.-]+\.(?:py|sh))(?![\w-])")
SOURCE_ROOTS = ("src/lesionstack", "benchmarks", "tests", "kaggle")


def source_problems(text: str, where: str) -> list[str]:
    """Source files (`x/y.py`, `y.py`, `benchmarks/z.sh`) named in inline code that the repository lacks."""
    out = []
    for m in _inline_spans(split_code(text)[1]):
        for path in SOURCE.findall(m.group(1)) if "://" not in m.group(1) else []:
            bare = "/" not in path and any(next((REPO / r).rglob(path), None) for r in SOURCE_ROOTS)
            if not bare and not any((REPO / root / path).exists() for root in ("", "src/lesionstack", "src")):
                out.append(f"{where}: no source file {path}")
    return out


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_source_file_the_docs_name_exists(page):
    assert source_problems(page.read_text(), str(page.relative_to(REPO))) == []


def test_the_checker_finds_what_does_not_exist():
    """The checks can fail: each kind of wrong name is reported, and the right ones are not."""
    bad = """
```bash
lesionstack trian-cnn demo/data --out x
lesionstack folds demo/data --n-folds 3 \\
    --no-such-option
```

Use `--no-such-flag`, `cnn.model.gaet`, `keep_it: last` and `stack.neg_pos_ratio` (real).

```yaml
cnn:
  epochs: 3
  epoch_count: 3
```
"""
    found = problems(bad, "bad.md")
    assert found == ["bad.md:3: no command `lesionstack trian-cnn`",
                     "bad.md:4: `lesionstack folds` has no option --no-such-option",
                     "bad.md:13: no config key `cnn.epoch_count` (YAML block)",
                     "bad.md:8: no command has the option --no-such-flag",
                     "bad.md:8: no config key `cnn.model.gaet`",
                     "bad.md:8: no config key `keep_it` (in `keep_it: ...`)"]
    good = "`lesionstack folds DATA --n-folds 5 --force`, `--fp16`, `cnn.model.gate`, `keep: last`, `stack.py`"
    assert problems(good, "good.md") == []


def test_the_source_check_finds_a_moved_module():
    text = "`train/cnn_config.py`, `tabular/gbdt.py::FAMILIES`, `pipeline.py`, `bench_data.py`, `train/gone.py`"
    assert source_problems(text, "m.md") == ["m.md: no source file train/gone.py"]


def test_an_old_option_spelling_is_named_with_todays():
    assert problems("`lesionstack run demo/data --out demo/artifacts`", "old.md") == [
        "old.md:1: `lesionstack run --out` is the old spelling: write --artifacts"]


def test_the_completeness_check_finds_an_undocumented_command_and_option():
    commands = {"folds": frozenset({"--out", "--seed"}), "secret": frozenset()}
    primary = {"folds": frozenset({"--out", "--seed"}), "secret": frozenset()}
    assert undocumented(commands, primary, "`lesionstack folds DATA --out F`") == [
        "no docs page shows `lesionstack secret`", "no docs page names `folds --seed`"]


def test_the_link_check_finds_a_missing_file_and_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## `run`: the whole pipeline\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#run-the-whole-pipeline) [gone](c.md) [no](a.md#nothing) [web](https://x.org/#y)\n")
    assert link_problems(page) == ["b.md: link to a missing file c.md", "b.md: link to a missing heading a.md#nothing"]


def test_the_table_check_finds_a_missing_key_and_a_wrong_default():
    expected = {"cnn.epochs": 10, "cnn.lr": 0.0001, "cnn.seed": 42}
    page = "| `cnn.epochs` | `12` | epochs |\n| `cnn.lr` | `0.0001` | lr |\n"
    assert table_problems(page, expected) == [
        "docs/configuration.md: the key `cnn.seed` is not in its tables",
        "docs/configuration.md: `cnn.epochs` says default `12`, the dataclass has 10"]


def test_the_readme_is_short_and_user_prose_names_no_commit_or_issue():
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= 300
    first_screen = "\n".join(readme[:40])  # a new user finds the real-data run on a Kaggle GPU at once
    assert "(docs/kaggle.md)" in first_screen and "(docs/getting-started.md)" in first_screen
    hashes = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/-])")
    for page in DOCS + [REPO / "CHANGELOG.md"]:
        text = page.read_text()
        assert not re.search(r"\bissues? \d", text, re.I), f"{page.name} names an issue number"
        assert not hashes.findall(text), f"{page.name} names commits {hashes.findall(text)}"
