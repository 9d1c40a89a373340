"""The docs cannot drift (issue 21 item 2): every command line in a `bash`/`sh`/`shell`/`console` block of
README.md and docs/*.md, and every relative link, is checked against the repository. Nothing is run.

A line is joined over backslash continuations, loses a leading `$ ` (in `console` blocks only `$ ` lines are
commands), its comments and redirections, and is split on `&&`, `||`, `;`, `|`, `&`. A command loses leading
`VAR=value` words and wrappers (`nice -n N`, `time`, `/usr/bin/time -v`, `timeout N`); `cd DIR` moves the block's
later commands when DIR is a folder of the repository or one the pipeline creates (not a clone's folder).
`source`, `docker ... IMAGE CMD`, any other program and quoted strings with spaces (`--exec-prefix '...'`) are not
checked.
- `python -m stages [--debug] COMMAND ARGS` (also under `torchrun ... -m`): COMMAND is a command of the app (or a
  placeholder in capitals) and ARGS parse with its Click parser (unknown options, missing values, extra
  arguments, missing required options), without converting values (a path need not exist yet).
- `make TARGET`: a target of the Makefile. `scripts/NAME ARGS`: an executable file whose text names every
  `--option` given; its other arguments are what it writes (`scripts/gpu-check REPORT`).
- `dvc repro|status TARGET`: TARGET (`STAGE`, `STAGE@ITEM`, `dvc.yaml:STAGE`) names a stage of dvc.yaml.
- A file path (an argument of a stages line with a `/` or a file extension, not a URL, `$VAR`, `<placeholder>`
  or absolute path) exists from the block's folder, or lies under a folder the pipeline creates (the first
  component of dvc.yaml's outs, metrics and plots; a `*DIR` default of scripts/ or the Makefile: demo/), or
  was written by an earlier line of the document (a value of --out, --metrics, --summary, --provenance).
- A relative Markdown link or image resolves to a file, and its `#anchor` to a heading's GitHub slug.
"""

import os
import re
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from ruamel.yaml import YAML
from typer._click.core import Command, Context
from typer._click.exceptions import UsageError
from typer.core import TyperGroup

from stages.cli import app
from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
OUTPUTS = {"--out", "--metrics", "--summary", "--provenance"}
EXTENSIONS = (".json", ".yaml", ".yml", ".csv", ".md", ".pt", ".safetensors", ".beton", ".py", ".txt", ".log")
WRAPPERS = {"nice": r"-n\d*|-?\d+", "timeout": r"-.*|\d+[smhd]?", "time": r"-[vp]", "/usr/bin/time": r"-[vp]"}
DVC = YAML(typ="safe").load(REPO / "dvc.yaml")
MAKE_TARGETS = {
    t for m in re.findall(r"^([\w. -]+):(?![:=])", (REPO / "Makefile").read_text(), re.M) for t in m.split()
}
SCRIPTS_TEXT = "".join(p.read_text() for p in [REPO / "Makefile", *(REPO / "scripts").iterdir()] if p.is_file())
CREATED = {
    str(next(iter(out)) if isinstance(out, dict) else out).split("/")[0]
    for stage in DVC["stages"].values()
    for key in ("outs", "metrics", "plots")
    for out in stage.get("do", stage).get(key, [])
} | set(re.findall(r"\w*DIR(?::-|=)([\w.-]+)", SCRIPTS_TEXT))


def split_fences(text: str) -> tuple[str, list[tuple[str, int, list[str]]]]:
    """(the text with fenced blocks blanked, [(language, line number of the first line, lines)])."""
    prose, fence, blocks = [], None, list[tuple[str, int, list[str]]]()
    for number, line in enumerate(text.splitlines(), 1):
        opening = re.match(r"(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and opening:
            indent, fence, language = opening.groups()
            blocks.append((language, number + 1, []))
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None  # a line of the fence's character alone, at least as many
        elif fence is not None:
            blocks[-1][2].append(line.removeprefix(indent))
        prose.append("" if fence or opening else line)
    return "\n".join(prose), [block for block in blocks if block[0] in SHELLS]


def command_lines(language: str, first: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of a block's commands."""
    number, joined = first, ""
    for offset, line in enumerate(lines):
        if not joined:
            number = first + offset
        if line.endswith("\\"):
            joined += line[:-1] + " "
        elif language != "console" or (joined + line).startswith("$ "):
            yield number, (joined + line).removeprefix("$ ")
            joined = ""


def commands(line: str) -> Iterator[list[str]]:
    """A line's commands as words, without leading assignments and wrappers."""
    line = re.sub(r"\s\d*[<>]+(&\d+|\s*[^\s;&|]+)", " ", line)  # redirections
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token.strip("&|;") or not words:
            words += [token] if token.strip("&|;") else []
            continue
        while words and (re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) or words[0] in WRAPPERS):
            pattern = WRAPPERS.get(words.pop(0), "")
            while pattern and words and re.fullmatch(pattern, words[0]):
                words.pop(0)
        yield words
        words = []


def parse(command: Command, name: str, args: list[str], parent: Context | None = None) -> None:
    """Parse `args` (a group's: global options, a command and its arguments) as Click does before it converts
    values (`resilient_parsing=True` would also let unknown options and missing values through); raise UsageError."""
    context = Context(command, info_name=name, parent=parent)
    options, rest, _ = command.make_parser(context).parse_args([*args])  # the parser consumes its list
    if isinstance(command, TyperGroup):
        subcommand = command.get_command(context, rest[0]) if rest else None
        if rest and not subcommand and not rest[0].isupper():  # in capitals, a placeholder: `COMMAND --help`
            raise UsageError(f"no command {rest[0]!r} (choose from {', '.join(command.list_commands(context))})")
        return parse(subcommand, rest[0], rest[1:], context) if subcommand else None
    missing = [p.opts[0] for p in command.get_params(context) if p.required and options.get(p.name) is None]
    if missing and "--help" not in args:
        raise UsageError(f"missing {', '.join(missing)}")
    if rest:
        raise UsageError(f"unexpected argument(s) {' '.join(rest)}")


def path_problems(args: list[str], cwd: Path, written: set[Path]) -> Iterator[str]:
    """Paths named in a stages command's arguments that neither exist nor are created; records its outputs."""
    for previous, arg in zip(["", *args], args):
        option, value = arg.split("=", 1) if arg.startswith("--") and "=" in arg else (previous, arg)
        if re.match(r"[-$</~]|\w+://", value) or " " in value or not ("/" in value or value.endswith(EXTENSIONS)):
            continue  # an option, a variable, a placeholder, an absolute path, a URL, a quoted command
        path = Path(os.path.normpath(cwd / value))
        if option in OUTPUTS:
            written.add(path)
        elif not is_created(path) and not any(w in (path, *path.parents) for w in written):
            yield f"no file {value}"


def is_created(path: Path) -> bool:
    """Whether `path` (relative to the repository) exists or lies under a folder the pipeline creates."""
    return not path.is_absolute() and (not path.parts or path.parts[0] in CREATED or any(REPO.glob(str(path))))


def line_problems(words: list[str], cwd: Path, written: set[Path]) -> Iterator[str]:
    program, args = (words or [""])[0], words[1:]
    if re.fullmatch(r"(\S*/)?(python3?|torchrun)", program) and "-m" in args:
        module, args = args[args.index("-m") + 1 :][:1], args[args.index("-m") + 2 :]
        program = "dvc" if module == ["dvc"] else "stages" if module == ["stages"] else program
    if program == "stages":
        try:
            parse(typer.main.get_command(app), "python -m stages", args)
        except UsageError as error:
            yield error.format_message()
        yield from path_problems(args, cwd, written)
    elif program == "make":
        yield from (
            f"no Makefile target {t!r}" for t in args if re.fullmatch(r"[\w.][\w.-]*", t) and t not in MAKE_TARGETS
        )
    elif program.removeprefix("./").startswith("scripts/"):
        script = REPO / cwd / program
        if not os.access(script, os.X_OK):
            yield f"no executable {program}"
        else:
            options = [arg.split("=")[0] for arg in args if arg.startswith("--")]
            yield from (
                f"{program} has no option {o}"
                for o in options
                if not re.search(rf"{re.escape(o)}\b(?!-)", script.read_text())
            )
    elif program == "dvc" and args[:1] in (["repro"], ["status"]):
        targets = [arg.split(":")[-1].split("@")[0] for arg in args[1:] if not arg.startswith("-")]
        yield from (f"no stage {t!r} in dvc.yaml" for t in targets if t not in DVC["stages"])


def link_problems(doc: Path, prose: str) -> Iterator[str]:
    prose = re.sub(r"`+[^`]*?`+", lambda m: re.sub(r"[^\n]", " ", m.group()), prose)
    for link in re.finditer(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)", prose):
        target, _, anchor = link.group(1).partition("#")
        if re.match(r"\w+:", target):
            continue
        path = (doc.parent / target) if target else doc
        number = prose.count("\n", 0, link.start()) + 1
        if not path.exists():
            yield f"{number}: link to a missing file: {link.group(1)}"
        elif anchor and path.suffix == ".md" and anchor not in slugs(split_fences(path.read_text())[0]):
            yield f"{number}: no heading for #{anchor} in {target or doc.name}"


def slugs(prose: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces as hyphens, -N on repeats."""
    seen: Counter[str] = Counter()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose, re.M):
        seen[re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")] += 1
    return {f"{slug}-{n}" if n else slug for slug, count in seen.items() for n in range(count)}


def doc_problems(doc: Path) -> list[str]:
    prose, blocks = split_fences(doc.read_text())
    name = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc.name
    problems, written = [f"{name}:{p}" for p in link_problems(doc, prose)], set[Path]()
    for language, first, lines in blocks:
        cwd = Path()
        for number, line in command_lines(language, first, lines):
            try:
                line_commands = list(commands(line))
            except ValueError as error:  # shlex: an unclosed quote
                line_commands, problems = [], [*problems, f"{name}:{number}: {error} (in: {line.strip()})"]
            for words in line_commands:
                if words[:1] == ["cd"] and len(words) > 1 and is_created(Path(os.path.normpath(cwd / words[1]))):
                    cwd = Path(os.path.normpath(cwd / words[1]))
                problems += [f"{name}:{number}: {p} (in: {line.strip()})" for p in line_problems(words, cwd, written)]
    return sorted(problems, key=lambda problem: int(problem.split(":")[1]))


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_doc_commands_and_links_hold(doc: Path) -> None:
    problems = doc_problems(doc)
    assert not problems, "\n".join(["commands or links in the docs that do not hold:", *problems])


def test_doc_problems_name_each_drift(tmp_path: Path) -> None:
    (tmp_path / "method.md").write_text("# The method\n")
    fence = "```"
    (tmp_path / "guide.md").write_text(f"""# A guide
See [the method](method.md#the-method), [its claim](method.md#claim), [a file](missing.md), [above](#a-guide).
{fence}console
$ python -m stages export --checkpoint runs/x.pt \\
    --out encoder.safetensors  # runs/ is created, then encoder.safetensors exists
$ cd projector-ib && make demo 2>&1 | tee demo.log  # cd: the clone's folder, not one here
$ python -m stages COMMAND --help; python -m stages report --help
$ nice -n 10 python -m stages --debug export --checkpoint encoder.safetensors --output e
$ make nothing && scripts/gpu-check --gpu; dvc repro nostage@x
$ python -m stages export --checkpoint runs/x.pt
$ cd docs && python -m stages export --checkpoint ../pipeline/no.pt --out
{fence}
""")
    problems = doc_problems(tmp_path / "guide.md")
    expected = [
        "guide.md:2: no heading for #claim in method.md",
        "guide.md:2: link to a missing file: missing.md",
        "guide.md:8: No such option: --output (Possible options: --out)",
        "guide.md:9: no Makefile target 'nothing'",
        "guide.md:9: scripts/gpu-check has no option --gpu",
        "guide.md:9: no stage 'nostage' in dvc.yaml",
        "guide.md:10: missing --out",
        "guide.md:11: Option '--out' requires an argument.",
        "guide.md:11: no file ../pipeline/no.pt",
    ]
    assert [problem.split(" (in: ")[0] for problem in problems] == expected
