"""`python model.py`: a greedy continuation on stdout, or one line of error."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args, tiny_dir):
    # `tiny` resolves to the test's checkpoint
    env = {**os.environ, "SEE_CACHE": str(tiny_dir.parent)}
    return subprocess.run([sys.executable, "model.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_prints_the_prompt_and_its_greedy_continuation(tiny_dir):
    from checkpoint import load
    from model import generate
    model, tok = load("tiny")
    ids = tok.encode("Translate to Spanish:")
    expected = tok.decode(ids + generate(model, [ids], 8, tok.eos_ids)[0])
    out = run(["--model", "tiny", "--prompt", "Translate to Spanish:", "--max-new-tokens", "8"],
              tiny_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n" and out.stdout.startswith("Translate to Spanish:")


def test_unknown_model_is_one_line_of_error(tiny_dir):
    out = run(["--model", "./missing-model", "--prompt", "hi"], tiny_dir)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: model './missing-model' not found: not a directory, a .gguf file, a hub repo id, "
        "'smollm2-135m' or 'tiny'"]


def test_prompt_too_long_for_the_context_is_one_line_of_error(tiny_dir):
    out = run(["--model", "tiny", "--prompt", "word " * 2100, "--max-new-tokens", "4"], tiny_dir)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "exceed the model's context of 2048" in out.stderr
