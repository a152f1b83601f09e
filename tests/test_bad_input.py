"""The bad-input sweep: malformed files and flags through the whole CLI (in-process), each one line on stderr
(``error: ...``), exit status 2, no traceback, and nothing written where the output would go."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import random_image
from ipadapter.cli import main


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def bad(sd15_pipe, adapter_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    sd15_pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    random_image(0).save(root / "ref.png")
    (root / "notes.txt").write_text("some notes\nnot a checkpoint\n")
    (root / "notes.bin").write_text("some notes\nnot a checkpoint\n")
    (root / "hello.pt").write_bytes(b"hello")
    for name in ("empty.safetensors", "empty.bin", "empty.png", "empty.json", "empty.npy"):
        (root / name).write_bytes(b"")
    (root / "folder").mkdir()
    (root / "zero.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
                                    + _chunk(b"IEND", b""))
    buf = io.BytesIO()
    random_image(1, size=(64, 64)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (16, 16)).save(root / "plain.png")  # an image without generation parameters
    return {"root": root, "model": root / "model", "adapter": adapter_file("sd15", "global"),
            "faceid": adapter_file("sd15", "faceid")}


def _generate(f, out: Path, **replace: str) -> list[str]:
    flags = {"--model": str(f["model"]), "--adapter": str(f["adapter"]), "--image": str(f["root"] / "ref.png"),
             "--steps": "2", "--width": "32", "--height": "32", "-o": str(out)}
    flags.update(replace)
    return [x for k, v in flags.items() if v is not None for x in (k, v)]  # None: leave the flag out


# (name, argv builder(files, root, out) -> argv, a fragment the error line must hold)
def _cases():
    r = lambda f, name: str(f["root"] / name)  # noqa: E731
    gen = lambda **kw: lambda f, out: ["generate", *_generate(f, out, **kw)]  # noqa: E731
    return [
        # adapters that are not checkpoints
        ("inspect text", lambda f, out: ["inspect", r(f, "notes.txt")], "not a checkpoint"),
        ("inspect text .bin", lambda f, out: ["inspect", r(f, "notes.bin")], "not a checkpoint"),
        ("inspect 5 bytes .pt", lambda f, out: ["inspect", r(f, "hello.pt")], "not a checkpoint"),
        ("inspect empty", lambda f, out: ["inspect", r(f, "empty.safetensors")], "empty file"),
        ("inspect empty .bin", lambda f, out: ["inspect", r(f, "empty.bin")], "empty file"),
        ("inspect folder", lambda f, out: ["inspect", r(f, "folder")], "is a folder"),
        ("inspect missing", lambda f, out: ["inspect", r(f, "nope.safetensors")], "no such"),
        ("convert text", lambda f, out: ["convert", r(f, "notes.txt"), str(out.with_suffix(".safetensors"))],
         "not a checkpoint"),
        ("adapter text", lambda f, out: ["generate", *_generate(f, out, **{"--adapter": r(f, "notes.txt")})],
         "not a checkpoint"),
        ("adapter 5 bytes", lambda f, out: ["generate", *_generate(f, out, **{"--adapter": r(f, "hello.pt")})],
         "not a checkpoint"),
        ("adapter folder", lambda f, out: ["generate", *_generate(f, out, **{"--adapter": r(f, "folder")})],
         "is a folder"),
        # images
        ("empty image", lambda f, out: gen(**{"--image": r(f, "empty.png")})(f, out), "not a readable image"),
        ("zero-size image", lambda f, out: gen(**{"--image": r(f, "zero.png")})(f, out), "not a readable image"),
        ("truncated png", lambda f, out: gen(**{"--image": r(f, "truncated.png")})(f, out), "truncated"),
        ("image is a folder", lambda f, out: gen(**{"--image": r(f, "folder")})(f, out), "no such image"),
        ("missing image", lambda f, out: gen(**{"--image": r(f, "nope.png")})(f, out), "no such image"),
        ("text as image", lambda f, out: gen(**{"--image": r(f, "notes.txt")})(f, out), "not a readable image"),
        ("missing init image", lambda f, out: gen(**{"--init-image": r(f, "nope.png")})(f, out), "no such image"),
        ("empty embeds", lambda f, out: gen(**{"--image": None, "--embeds": r(f, "empty.safetensors")})(f, out),
         "empty.safetensors"),
        ("empty face embeds", lambda f, out: gen(**{"--image": None, "--adapter": str(f["faceid"]),
                                                    "--face-embeds": r(f, "empty.npy")})(f, out), "empty.npy"),
        ("model is a file", lambda f, out: gen(**{"--model": r(f, "notes.txt")})(f, out), "notes.txt"),
        ("model folder empty", lambda f, out: gen(**{"--model": r(f, "folder")})(f, out), "model_index.json"),
        # flags
        ("guidance nan", lambda f, out: gen(**{"--guidance": "nan"})(f, out), "--guidance"),
        ("guidance inf", lambda f, out: gen(**{"--guidance": "inf"})(f, out), "--guidance"),
        ("num-images 0", lambda f, out: gen(**{"--num-images": "0"})(f, out), "--num-images"),
        ("num-images -1", lambda f, out: gen(**{"--num-images": "-1"})(f, out), "--num-images"),
        ("num-images huge", lambda f, out: gen(**{"--num-images": str(10**9)})(f, out), "--num-images"),
        ("steps 0", lambda f, out: gen(**{"--steps": "0"})(f, out), "--steps"),
        ("steps huge", lambda f, out: gen(**{"--steps": str(10**9)})(f, out), "--steps"),
        ("width huge", lambda f, out: gen(**{"--width": str(8 * 10**8)})(f, out), "--width"),
        ("width not /8", lambda f, out: gen(**{"--width": "33"})(f, out), "--width"),
        ("seed text", lambda f, out: gen(**{"--seed": "abc"})(f, out), "--seed"),
        ("output suffix", lambda f, out: gen(**{"-o": str(out.with_suffix(".txt"))})(f, out), "unknown image suffix"),
        ("output gif", lambda f, out: gen(**{"-o": str(out.with_suffix(".gif"))})(f, out), "unknown image suffix"),
        ("reuse text", lambda f, out: gen(**{"--reuse-parameters": r(f, "notes.txt")})(f, out),
         "not a readable image"),
        ("reuse plain png", lambda f, out: gen(**{"--reuse-parameters": r(f, "plain.png")})(f, out),
         "no generation parameters"),
        ("reuse missing", lambda f, out: gen(**{"--reuse-parameters": r(f, "nope.png")})(f, out), "no such"),
        ("embed suffix", lambda f, out: ["embed", "--model", str(f["model"]), "--adapter", str(f["adapter"]),
                                         "--image", r(f, "ref.png"), "-o", str(out.with_suffix(".txt"))],
         ".safetensors"),
        ("eval data text", lambda f, out: ["eval", "--data", r(f, "notes.txt"), "--out", str(out.with_suffix(".json"))],
         "notes.txt"),
        ("eval data empty json", lambda f, out: ["eval", "--data", r(f, "empty.json"),
                                                 "--out", str(out.with_suffix(".json"))], "empty.json"),
        ("train config text", lambda f, out: ["train", "--config", r(f, "notes.txt"), "--output", str(out)],
         "not valid JSON"),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_nothing_written(capsys, bad, tmp_path, case):
    _, build, fragment = next(c for c in CASES if c[0] == case)
    out = tmp_path / "out" / "result.png"
    argv = build(bad, out)
    before = sorted(p.name for p in bad["root"].iterdir())
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (one line too: see cli._Parser)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert all(line.startswith("note: ") for line in err.splitlines() if "error:" not in line), err
    assert fragment in errors[0], errors[0]
    assert not (tmp_path / "out").exists()  # nothing at the output path, not even its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert sorted(p.name for p in bad["root"].iterdir()) == before
