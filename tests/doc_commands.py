"""Run the shell commands that the docs show, exactly as written, inside the test process.

A documented block is the first ```sh block after a line that names the test running it; continuation lines
(`\\`) are joined. Commands run from a scratch folder that links the repository's inputs (hparams/, tests/,
duplex/, example/), so relative paths in the docs (tests/data/corpus, results/...) mean what they mean in a
checkout, and results/ lands in the scratch folder.
"""
import contextlib
import os
import pathlib
import runpy
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINKED = ("hparams", "tests", "duplex", "example")


def documented_commands(doc, after):
    """The commands of the first ```sh block following the first line of `doc` containing `after`."""
    lines = (ROOT / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    opening = next(i for i in range(start, len(lines)) if lines[i].strip() == "```sh")
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].strip() == "```")
    text = "\n".join(lines[opening + 1:closing]).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def checkout_view(folder):
    """cwd = `folder`, holding links to the repository inputs the documented commands read."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (folder / name).exists():
            (folder / name).symlink_to(ROOT / name)
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)


def run_command(tokens):
    """Run `python <script> args...` in process; returns what the script's entry point returns (the Brain for
    a training stage, the exit code for the inference scripts)."""
    assert tokens[0] == "python", f"documented command should start with python: {tokens}"
    script, argv = tokens[1], tokens[2:]
    if script.startswith("train_stage"):
        names = runpy.run_path(str(ROOT / script))  # the script's own imports and docstring, not its __main__
        return names["run_stage"](names["DuplexBrain"], argv, usage=names["__doc__"])
    if script in ("CustomGenerator.py", "duplex_inference.py"):
        module = runpy.run_path(str(ROOT / script))
        return module["main"](argv)
    raise AssertionError(f"no runner for documented command {tokens}")
