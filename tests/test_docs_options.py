"""Every ``3dino`` command's options and its docs page agree, in both directions.

Conventions checked here (docs/cli.md states them for readers):

- **One page per command**: ``docs/<command>.md`` with ``-`` replaced by ``_``
  (``adapt-highres`` -> ``docs/adapt_highres.md``). Its H1 title names the command in a code span
  (`` # `3dino adapt-highres`: ... ``). Other pages may name a command in their title too
  (``docs/probe.md``: `` `3dino finetune --head probe` ``); their options are checked against
  that command in the reverse direction only.
- **The options table**: a section headed ``Options``; the first cell of each row names options
  (``-d, --dataset``, ``--avgpool/--no-avgpool``). Every long and short name of the command is in
  its page's table (forward), and every name in the table is one of the command's (reverse).
- **Shared options**: ``--verbose``/``-v`` and ``--no-progress`` (every command has them) may be
  documented once, in the options table of ``docs/cli.md``, together with the top-level
  ``--version``. Every other option is documented on each command's page, because defaults and
  meanings differ between commands (``--num-workers``, ``--device``, ``--num-processes``).
- **Command lines anywhere in docs/, README.md and DEVELOPERS.md**: every ``3dino <command> ...`` (or
  ``-m threedino_pipe.cli <command> ...``) in a code block or code span names an existing command
  and only that command's options.
- **Other mentions**: an option written elsewhere on a command's page (prose, table cells, code
  spans) is one of that command's; on other pages, one of some command's. A foreign program's
  option is written after the program's name in the same code span or line
  (`` `torchrun --nproc-per-node 4` ``), and is then not checked.

The commands come from the typer app (``typer.main.get_command``), and a subprocess of the real
``3dino`` checks that the app is what the installed command runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer.main
from conftest import REPO, run_3dino
from typer.testing import CliRunner

from threedino_pipe.cli import app

DOCS = REPO / "docs"
CLI_PAGE = DOCS / "cli.md"
COMMON = ("--verbose", "-v", "--no-progress")
TOP_LEVEL = ("--version", "--help")
# a code span starting with one of these is another program's command line, whose options are not ours
FOREIGN_PROGRAM_RE = re.compile(
    r"(torchrun|srun|sbatch|#SBATCH|salloc|python3?|pip|pytest|nvidia-smi|nnUNetv2_\w+|\S+\.py)$")
# pages whose prose may name options of something else than a command (their command lines are still checked)
MENTIONS_EXEMPT = {"benchmarks.md": "names the options of the benchmarks/ scripts"}

OPTION_RE = re.compile(r"(?<![\w.<-])--?[A-Za-z][\w-]*")
LONG_OPTION_RE = re.compile(r"(?<![\w.<-])--[A-Za-z][\w-]*")
INVOCATION_RE = re.compile(r"(?:(?<![\w/.-])3dino|-m threedino_pipe\.cli)[ \t]+(\S+)")
SPAN_RE = re.compile(r"`([^`\n]+)`")
HEADING_RE = re.compile(r"^(#+)\s+(.*)$")


def _group():
    return typer.main.get_command(app)


COMMANDS = dict(_group().commands)


def page_of(command: str) -> Path:
    """The docs page of ``command``: docs/<command>.md, ``-`` -> ``_``."""
    return DOCS / (command.replace("-", "_") + ".md")


def option_names(command: str | None) -> set[str]:
    """Every long and short name (both sides of ``--a/--no-a`` pairs) of a command's options."""
    params = _group().params if command is None else COMMANDS[command].params
    names = {name for p in params if p.param_type_name == "option" for name in (*p.opts, *p.secondary_opts)}
    return names | {"--help"}


@dataclass
class Page:
    """What a docs page says about options, each with its line number."""

    path: Path
    title_command: str | None = None
    table: list[tuple[str, int]] = field(default_factory=list)  # names in the options tables' first cells
    invocations: list[tuple[str, list[str], int]] = field(default_factory=list)  # (command word, names, line)
    mentions: list[tuple[str, int]] = field(default_factory=list)  # other option names
    rows: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (default cell, whole row, line)


def _invocations(snippet: str, lineno: int, page: Page) -> str:
    """Record the ``3dino <command> ...`` invocations of a snippet; return the text before the first."""
    snippet = re.split(r"\s#", snippet)[0]
    matches = list(INVOCATION_RE.finditer(snippet))
    if not matches:
        return snippet
    ends = [m.start() for m in matches[1:]] + [len(snippet)]
    for m, end in zip(matches, ends, strict=True):
        rest = snippet[m.end():end]
        rest = re.split(r"&&|;|\|\||\|", rest)[0]
        word = m.group(1)
        if word.startswith("-"):  # 3dino --version
            page.invocations.append(("", [word, *OPTION_RE.findall(rest)], lineno))
        else:
            page.invocations.append((word, OPTION_RE.findall(rest), lineno))
    return snippet[:matches[0].start()]


def parse_page(path: Path) -> Page:
    """Options tables, command lines and other option mentions of one markdown page."""
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    in_code = False
    options_level = None  # heading level of the current Options section, None outside one
    table_row = 0
    pending = ""  # a code line continued with a backslash
    continued = None  # the command of the code line above, which indented lines continue
    open_span = ""  # the start of a code span that a prose line left open
    header: list[str] = []  # the header cells of the current options table
    for lineno, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_code, continued = not in_code, None
            continue
        if in_code:
            if line.lstrip().startswith("#"):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            if line[:1].isspace() and continued is not None and not pending:  # indented: goes on with the command
                names = OPTION_RE.findall(re.split(r"\s#", line)[0])
                page.invocations.append((continued, names, lineno))
                continue
            known = len(page.invocations)
            _invocations(pending + line, lineno, page)  # other lines of code blocks belong to other programs
            continued = page.invocations[-1][0] if len(page.invocations) > known else None
            pending = ""
            continue
        heading = HEADING_RE.match(line)
        if heading:
            level, text = len(heading.group(1)), heading.group(2)
            if level == 1 and page.title_command is None:
                m = re.search(r"`3dino ([a-z][a-z-]*)", text)
                page.title_command = m.group(1) if m else None
            if options_level is not None and level <= options_level:
                options_level = None
            if re.match(r"options\b", text.strip(), re.IGNORECASE):
                options_level = level
        is_row = line.startswith("|")
        table_row = table_row + 1 if is_row else 0
        first_cell = ""
        if is_row and options_level is not None and table_row == 1:
            header = [c.strip().lower() for c in line.split("|")[1:-1]]
        if is_row and options_level is not None and table_row > 2:  # skip the header and separator rows
            first_cell = line.split("|")[1]
            page.table += [(name, lineno) for name in OPTION_RE.findall(first_cell)]
            cells = line.split("|")[1:-1]
            if len(header) > 1 and header[1] == "default" and len(cells) > 1:
                page.rows.update({name: (cells[1].strip(), line, lineno) for name in OPTION_RE.findall(first_cell)})
        prose = line.replace(first_cell, "", 1) if first_cell else line
        if open_span and line.strip() and not is_row and not heading:  # a code span goes on from the line above
            prose = open_span + " " + prose
        open_span = ""
        if prose.count("`") % 2:  # a code span that goes on to the next line
            prose, open_span = prose[:prose.rindex("`")], prose[prose.rindex("`"):]
        for span in SPAN_RE.findall(prose):
            before = _invocations(span, lineno, page)
            words = [w for w in before.split() if not re.fullmatch(r"\w+=\S*", w)]  # skip VAR=value prefixes
            if words and FOREIGN_PROGRAM_RE.match(words[0]):
                continue
            page.mentions += [(name, lineno) for name in LONG_OPTION_RE.findall(before)]
        bare = SPAN_RE.sub(" ", prose)
        page.mentions += [(name, lineno) for name in LONG_OPTION_RE.findall(bare)]
    return page


def all_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _where(page: Page, lineno: int) -> str:
    return f"{page.path.relative_to(REPO)}:{lineno}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_page_documents_every_option_of_the_command(command):
    path = page_of(command)
    assert path.is_file(), f"`3dino {command}` has no docs page: write {path.relative_to(REPO)}"
    page = parse_page(path)
    assert page.title_command == command, f"{path.name}: the H1 title must name `3dino {command}`"
    documented = {name for name, _ in page.table}
    shared = {name for name, _ in parse_page(CLI_PAGE).table} if CLI_PAGE.is_file() else set()
    missing = sorted(name for name in option_names(command) - {"--help"}
                     if name not in documented and not (name in COMMON and name in shared))
    assert not missing, f"{path.name}: options of `3dino {command}` missing from its Options table: {missing}"


@pytest.mark.parametrize("path", [*all_pages(), REPO / "README.md", REPO / "DEVELOPERS.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_page_names_only_existing_options(path):
    page = parse_page(path)
    everything = set().union(*(option_names(c) for c in COMMANDS), option_names(None))
    errors = []
    own = option_names(page.title_command) if page.title_command in COMMANDS else None
    if page.title_command is not None and own is None:
        errors.append(f"{path.name}: the title names `3dino {page.title_command}`, which is not a command")
    if path == CLI_PAGE:
        own = everything
    for name, lineno in page.table:
        if own is None:
            errors.append(f"{_where(page, lineno)}: an Options table on a page whose title names no command")
        elif name not in own:
            errors.append(f"{_where(page, lineno)}: {name} in the Options table is not an option of "
                          f"`3dino {page.title_command}`")
    for word, names, lineno in page.invocations:
        if word and not re.fullmatch(r"[a-z][a-z-]*", word):  # a placeholder: 3dino <command> --help
            valid = set(COMMON) | {"--help"}
        elif word and word not in COMMANDS:
            errors.append(f"{_where(page, lineno)}: `3dino {word}` is not a command ({', '.join(COMMANDS)})")
            continue
        else:
            valid = option_names(word or None)
        errors += [f"{_where(page, lineno)}: `3dino {word}` has no option {name}" for name in names
                   if name not in valid]
    for name, lineno in [] if path.name in MENTIONS_EXEMPT else page.mentions:
        if name not in (own if own is not None else everything):
            whose = f"`3dino {page.title_command}`" if own is not None else "any command"
            errors.append(f"{_where(page, lineno)}: {name} is not an option of {whose} (write the command "
                          "before it, e.g. `3dino plan --memory-gb`, or `torchrun --nnodes` for another program)")
    assert not errors, "\n".join(errors)


def test_shared_options_page():
    """docs/cli.md documents the shared options (present in every command) and the top-level ones."""
    for command in COMMANDS:
        assert set(COMMON) <= option_names(command), f"`3dino {command}` lacks a shared option of {COMMON}"
    assert set(TOP_LEVEL) <= option_names(None)
    page = parse_page(CLI_PAGE)
    assert page.title_command is None
    documented = {name for name, _ in page.table}
    missing = sorted((set(COMMON) | option_names(None)) - {"--help"} - documented)
    assert not missing, f"docs/cli.md: shared or top-level options missing from its Options table: {missing}"


def test_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", index))
    pages = {p.name for p in all_pages()} - {"README.md"}
    assert not pages - linked, f"docs/README.md does not list {sorted(pages - linked)}"
    assert not linked - pages, f"docs/README.md links missing pages {sorted(linked - pages)}"


NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")
# a range as docs and help text write it: [a, b], [a, b) or (a-b)
RANGE_RE = re.compile(r"\[(-?[\d.e-]+), (-?[\d.e-]+)([\])])|\((-?\d+)-(-?\d+)\)")


def _number(text: str) -> float | None:
    m = NUMBER_RE.match(text)
    return float(m.group(0).replace(",", "")) if m else None


def default_problem(param, cell: str) -> str | None:
    """How the default cell of an options table disagrees with the option's default, or None.

    Checked where the table states a default: ``required`` for required options, ``off``/``on`` for
    flags, the number for numbers, the first word for strings and paths. A default of None (worked
    out at run time, described in words) is not checked.
    """
    text = cell.replace("`", "").strip()
    default = param.default
    if param.required:
        return None if "required" in text else f"it is required, the table says {cell!r}"
    if default is None or param.multiple:
        return None
    if isinstance(default, bool):
        want = "on" if default else "off"
        return None if text.split(" ")[0] == want else f"the default is {want}, the table says {cell!r}"
    if isinstance(default, int | float):
        value = _number(text)
        return None if value is not None and abs(value - default) <= 1e-12 * max(1.0, abs(default)) else \
            f"the default is {default}, the table says {cell!r}"
    word = re.split(r"[\s,;(]", text)[0]
    return None if word == str(default) else f"the default is {default}, the table says {cell!r}"


def range_problems(param, text: str, where: str) -> list[str]:
    """A typer range (min/max) must be stated in ``text`` as ``[min, max]`` when it has a maximum, and every
    range ``text`` states must be that one."""
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    stated = []
    for m in RANGE_RE.finditer(text):
        if m.group(1) is not None:
            stated.append((float(m.group(1)), float(m.group(2)), m.group(3) == "]"))
        else:
            stated.append((float(m.group(4)), float(m.group(5)), True))
    problems = [f"{where} states the range {a:g}..{b:g}{'' if closed else ' (open)'}, the option's is "
                f"{low}..{high}" for a, b, closed in stated
                if not (closed and low is not None and high is not None and (a, b) == (float(low), float(high)))]
    if high is not None and not stated:
        problems.append(f"{where} does not state the range [{low}, {high}]")
    return problems


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_options_table_defaults_and_ranges_agree_with_the_command(command):
    """The default column of the command's options table equals each option's default (where the table states
    one), and ranges (typer's min/max) agree in the table and in the --help text."""
    page = parse_page(page_of(command))
    errors = []
    for param in COMMANDS[command].params:
        if param.param_type_name != "option":
            continue
        name = max(param.opts, key=len)
        row = next((page.rows[n] for n in (*param.opts, *param.secondary_opts) if n in page.rows), None)
        if row is None:
            continue
        cell, line, lineno = row
        problem = default_problem(param, cell)
        if problem:
            errors.append(f"{_where(page, lineno)}: {name}: {problem}")
        errors += [f"{_where(page, lineno)}: {name}: {p}" for p in range_problems(param, line, "the table row")]
        errors += [f"`3dino {command} --help`: {name}: {p}" for p in
                   range_problems(param, param.help or "", "the help text") if "does not state" not in p]
    assert not errors, "\n".join(errors)


def _help_options(text: str) -> set[str]:
    """Option names in the Options panel of a rich ``--help`` screen (``--run,--run-name``, ``-v``)."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"^│\s+(?:\*\s+)?((?:-[\w,-]+\s+)+)", line)
        if m:
            names |= {n for chunk in m.group(1).split() for n in chunk.split(",") if n}
    return names


def test_real_cli_has_the_commands_and_options_of_the_app():
    """`3dino --help` (subprocess) lists the app's commands; two commands' real --help list their options."""
    env = {"COLUMNS": "1000", "TERM": "dumb", "NO_COLOR": "1"}
    top = run_3dino("--help", env=env)
    assert top.returncode == 0, top.stderr
    listed = set(re.findall(r"^│\s+([a-z][a-z-]*)\s", top.stdout, re.MULTILINE))
    assert listed == set(COMMANDS), (listed, set(COMMANDS))
    for command in ("pretrain", "embed"):  # the most options incl. two long names; a --x/--no-x pair
        result = run_3dino(command, "--help", env=env)
        assert result.returncode == 0, result.stderr
        assert _help_options(result.stdout) == option_names(command), command


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_rendered_help_lists_the_introspected_options(command):
    """typer's rendered --help of every command shows exactly the options the docs are checked against."""
    result = CliRunner().invoke(app, [command, "--help"], env={**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"},
                                terminal_width=1000)
    assert result.exit_code == 0, result.output
    assert _help_options(result.output) == option_names(command)


def test_parser_sees_tables_invocations_and_mentions(tmp_path):
    """The page parser on a small page: what counts as table, command line and mention."""
    page = tmp_path / "x.md"
    page.write_text("\n".join([
        "# `3dino embed`: x", "", "```", "3dino embed -m RUN \\", "   --layers 1   # --not-this", "      [--avgpool]",
        "", "torchrun --nnodes 2 -m threedino_pipe.cli embed --device cpu", "#SBATCH --gres=gpu:1", "```", "",
        "## Options", "| option | default |", "| --- | --- |", "| `-m, --model` | `--layers` text |",
        "| `--avgpool/--no-avgpool` | on |", "", "## Other", "| `--ignored-table` | x |",
        "Prose --bare and `--span`, `3dino plan --memory-gb`, `torchrun --nproc-per-node 2`, `3dino predict",
        "--tta` and `torchrun", "--nnodes 2`.",
    ]))
    parsed = parse_page(page)
    assert parsed.title_command == "embed"
    assert [n for n, _ in parsed.table] == ["-m", "--model", "--avgpool", "--no-avgpool"]
    assert [(w, n) for w, n, _ in parsed.invocations] == [("embed", []), ("embed", ["-m", "--layers"]),
                                                          ("embed", ["--avgpool"]), ("embed", ["--device"]),
                                                          ("plan", ["--memory-gb"]), ("predict", ["--tta"])]
    assert sorted(n for n, _ in parsed.mentions) == ["--bare", "--ignored-table", "--layers", "--span"]


def test_default_and_range_checks_catch_disagreements():
    """The checks above on real options: a wrong default, a wrong or missing range are found."""
    params = {max(p.opts, key=len): p for p in COMMANDS["finetune"].params}
    seed, overlap, restart, dataset = params["--seed"], params["--overlap"], params["--restart"], params["--dataset"]
    assert default_problem(seed, "0") is None and default_problem(seed, "1")
    assert default_problem(overlap, "0.5") is None and default_problem(overlap, "`0.75`")
    assert default_problem(restart, "off") is None and default_problem(restart, "on")
    assert default_problem(dataset, "required") is None and default_problem(dataset, "501")
    assert default_problem(params["--backbone"], "`auto`") is None and default_problem(params["--backbone"], "none")
    assert not range_problems(seed, "subset draw (0-4)", "row") and range_problems(seed, "subset draw (0-5)", "row")
    assert range_problems(seed, "subset draw S", "row") == ["row does not state the range [0, 4]"]
    assert range_problems(overlap, "in [0, 1)", "row") and not range_problems(overlap, "in [0, 0.99]", "row")
