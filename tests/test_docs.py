"""The README and the guides in docs/ say only what the code does.

"README and guides never contain commands that the tests do not run in some
form": this file is that form. It checks, without running any training:

- the documentation site (mkdocs.yml: docs/ and the API reference generated
  from the docstrings) builds with ``mkdocs build --strict``, so a broken
  link or anchor between guides, a page missing from the nav or a docstring
  reference mkdocstrings cannot resolve fails here;
- README.md is at most 250 lines, and each of its relative links names a file
  that exists (and, into docs/, an anchor the built page has);
- every ``python main.py ...`` / ``simclr-jax ...`` command in a shell code
  block or an inline code span of README.md and docs/*.md names a recipe that
  exists, and every ``--config.FIELD=VALUE`` it sets applies to that recipe:
  the config is built in-process as main.py builds it (ml_collections'
  config_flags, locked, on a fresh FlagValues) and passed to
  ``config_validation.validate`` for one device and one process. Shell
  variables are expanded from the assignments of the same code block; one
  left unset (a path such as $MODEL, a choice such as $LR) becomes a
  placeholder string for a string field and the recipe's own value for any
  other. What is not checked: that paths exist (validate reads no files) and
  that a run's results match the figures quoted;
- every other flag such a command passes (``--workdir``, ``--cpu_devices``)
  is defined by main.py or the package, and every ``python -m simclr_jax.X``,
  ``benchmarks/X.py``, ``examples/X.py``, ``tests/X.py`` and ``configs/X.py``
  the documents name exists.

The checkers return lists of problems; ``test_checkers_catch_mistakes`` feeds
each a document with one mistake, so none can pass by finding nothing.
"""
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from simclr_jax import config_validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
DEFAULT_RECIPE = "configs/cifar10.py"  # main.py's default --config
COMMAND = re.compile(r"(?:^|[\s;&|(])(?:python3?\s+main\.py|simclr-jax)(?=\s|$)(.*)")
ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(\S.*)$")
VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")


def documents() -> list[pathlib.Path]:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def shell_blocks(text: str) -> list[str]:
    """The shell code blocks of a markdown text, continuation lines joined."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
    return [body.replace("\\\n", " ") for lang, body in blocks if lang in SHELL_LANGUAGES]


def inline_commands(text: str) -> list[str]:
    """Inline code spans outside code blocks that are main.py commands."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [span for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.search(span)]


def main_commands(text: str) -> list[list[str]]:
    """Each main.py command's arguments, shell variables expanded from the
    block's own assignments (unset ones are left as $NAME)."""
    commands = []
    for block in shell_blocks(text) + inline_commands(text):
        known = {}
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            expanded = VARIABLE.sub(lambda m: known.get(m.group(1), m.group(0)), line)
            if (assignment := ASSIGNMENT.match(expanded)) and not COMMAND.search(expanded):
                known[assignment.group(1)] = " ".join(shlex.split(assignment.group(2), comments=True))
            elif match := COMMAND.search(expanded):
                rest = re.split(r"[;&|\"]", match.group(1))[0]
                commands.append(shlex.split(rest, comments=True))
    return commands


def defined_flags() -> set[str]:
    """Flags main.py or the package define (absl), besides --config."""
    sources = [ROOT / "main.py"] + sorted((ROOT / "simclr_jax").rglob("*.py"))
    names = {"help", "helpfull", "config"}
    for path in sources:
        names |= set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", path.read_text()))
    return names


def recipe_path(name: str) -> pathlib.Path:
    """A --config value: a path (configs/smoke.py) or a bundled name (smoke)."""
    return ROOT / (name if name.endswith(".py") else f"configs/{name}.py")


def build_config(recipe: pathlib.Path, overrides: list[str]):
    """The locked config main.py would build from these flags."""
    argv = ["main.py", f"--config={recipe}"] + overrides
    values = flags.FlagValues()  # config_flags registers the overrides it finds in sys_argv
    config_flags.DEFINE_config_file("config", None, "recipe", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def command_problems(args: list[str], flag_names: set[str]) -> list[str]:
    """Why ``python main.py ARGS`` would be refused before it loads anything
    (an unknown recipe, flag or field, a value a rule rejects); [] if none."""
    shown = "main.py " + " ".join(args)
    recipe_arg = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    recipe = recipe_path(recipe_arg[0] if recipe_arg else DEFAULT_RECIPE)
    if not recipe.is_file():
        return [f"{shown}: no recipe {recipe.relative_to(ROOT)}"]
    overrides = [a for a in args if a.startswith("--config.")]
    others = [a for a in args if a.startswith("--") and not a.startswith("--config")]
    problems = [f"{shown}: unknown flag {a}" for a in others
                if a[2:].split("=", 1)[0].removeprefix("no") not in flag_names]
    problems += [f"{shown}: stray argument {a}" for a in args if not a.startswith("--")]
    try:
        fixed = build_config(recipe, [a for a in overrides if "$" not in a])
        for i, arg in enumerate(overrides):
            if "$" in arg:
                name, _ = arg[len("--config."):].split("=", 1)
                value = _field(fixed, name)
                overrides[i] = f"--config.{name}={'placeholder' if isinstance(value, str) else value}"
        config_validation.validate(build_config(recipe, overrides), num_devices=1, num_processes=1)
    except (flags.Error, KeyError, AttributeError, ValueError) as e:
        problems.append(f"{shown}: {type(e).__name__}: {e}")
    return problems


def missing_names(text: str) -> list[str]:
    """Modules, scripts, tests and recipes the text names that do not exist."""
    missing = [f"python -m {m}" for m in re.findall(r"python3? -m (simclr_jax(?:\.\w+)+)", text)
               if not (ROOT.joinpath(*m.split(".")).with_suffix(".py").is_file()
                       or ROOT.joinpath(*m.split("."), "__main__.py").is_file())]
    missing += [p for p in re.findall(r"(?<![\w/.])((?:benchmarks|examples|tests|configs)/\w+\.py)", text)
                if not (ROOT / p).is_file()]
    return missing


def link_problems(text: str, site: pathlib.Path) -> list[str]:
    """README's relative links whose file, or anchor on the built page, is missing."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        if not (ROOT / path).exists():
            problems.append(f"{target}: no file {path}")
        elif anchor and path.startswith("docs/") and path.endswith(".md"):
            stem = pathlib.Path(path).stem
            page = site / "index.html" if stem == "index" else site / stem / "index.html"
            if not page.is_file() or f'id="{anchor}"' not in page.read_text():
                problems.append(f"{target}: no anchor #{anchor} in {path}")
    return problems


def build_site(site: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site),
                           "--config-file", str(ROOT / "mkdocs.yml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    result = build_site(site)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return site


def test_site_builds_in_strict_mode(site):
    assert (site / "api" / "index.html").is_file()
    assert 'id="simclr_jax.encoder.load_encoder"' in (site / "api" / "index.html").read_text()


def test_readme_is_the_front_door(site):
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    # .ci/run runs the README's test command: it must stay exactly this line.
    assert any(line.split("#")[0].strip() == "python -m pytest -q" for line in lines)
    assert link_problems(README.read_text(), site) == []


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_commands_run_as_written(path):
    commands = main_commands(path.read_text())
    names = defined_flags()
    problems = [p for args in commands for p in command_problems(args, names)]
    assert problems == []
    assert missing_names(path.read_text()) == []


def test_every_guide_has_commands_checked():
    """The extraction finds the commands it should (so the test above is not
    vacuous): the README's quick start and the guides' recipes."""
    counts = {p.name: len(main_commands(p.read_text())) for p in documents()}
    assert counts["README.md"] >= 5 and counts["pretraining.md"] >= 5 and counts["distillation.md"] >= 5, counts


def test_checkers_catch_mistakes(site):
    names = defined_flags()

    def problems(markdown):
        return [p for args in main_commands(markdown) for p in command_problems(args, names)]

    good = "```bash\nD=../data\npython main.py --config=configs/smoke.py --config.data_dir=$D \\\n" \
           "    --config.batch_size=64 --workdir=runs/x\n```\n"
    assert problems(good) == []
    assert problems(good.replace("configs/smoke.py", "configs/nope.py"))  # no such recipe
    assert problems(good.replace("batch_size=64", "batch_sise=64"))  # no such field
    assert problems(good.replace("batch_size=64", "batch_size=-1"))  # a rule rejects it
    assert problems(good.replace("--workdir", "--work_dir"))  # no such flag
    assert problems("`python main.py --config=configs/knn.py --config.model.depth=51`")  # inline span
    assert problems("```bash\npython main.py --config=configs/distill.py --config.distill.learning_rate=$LR "
                    "--config.lr=$LR\n```\n")  # unset variable on a field the recipe lacks
    assert missing_names("python -m simclr_jax.nope and benchmarks/nope.py")
    assert link_problems("[a](docs/results.md#memory-per-device)", site) == []
    assert link_problems("[a](docs/nope.md)", site)
    assert link_problems("[b](docs/results.md#nope)", site)
