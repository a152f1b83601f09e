"""Library errors name Python parameters; the command line shows the flags (one table: cli/args.py FLAGS)."""

from __future__ import annotations

import warnings

import pytest

from conftest import random_image
from ipadapter.cli import main
from ipadapter.cli.args import FLAGS, flag_message
from ipadapter.core.errors import IPAdapterError, IPAdapterNote, note, param, shown_as


def test_a_marked_parameter_reads_as_itself_and_shows_as_its_flag():
    e = IPAdapterError(f"{param('strength')} needs {param('init_image')} (how far img2img moves)")
    assert str(e) == "strength needs init_image (how far img2img moves)"
    assert flag_message(e) == "--strength needs --init-image (how far img2img moves)"
    shown = shown_as(e, {"strength": "Denoising strength"})
    assert shown == "Denoising strength needs init_image (how far img2img moves)"
    assert flag_message(IPAdapterError("plain text, data and images")) == "plain text, data and images"  # unmarked


def test_notes_too():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        note(f"{param('mask_image')} m.png: 16x16 resized")
    assert str(seen[0].message) == "mask_image m.png: 16x16 resized"
    assert flag_message(seen[0].message) == "--inpaint-mask m.png: 16x16 resized"
    assert issubclass(seen[0].category, IPAdapterNote)


def test_every_flag_in_the_table_exists():
    from ipadapter.cli import build_parser

    parser = build_parser()
    known = {opt for action in parser._subparsers._group_actions[0].choices.values() for a in action._actions
             for opt in a.option_strings}
    assert set(FLAGS.values()) <= known


@pytest.mark.parametrize("shape", ["sd15"])
def test_generate_names_parameters_the_cli_names_flags(pipe_for, adapter_file, tmp_path, capsys, shape):
    import ipadapter

    ip = ipadapter.load(pipe_for(shape), adapter_file(shape, "global"))
    try:
        with pytest.raises(IPAdapterError) as info:
            ip.generate(images=[random_image(0)], strength=0.5, num_inference_steps=1)
        assert str(info.value) == "strength needs init_image (it is how far img2img moves from it)"
        with pytest.raises(IPAdapterError) as info:
            ip.generate(images=[random_image(0)], start=0.6, end=0.3, num_inference_steps=1)
        assert str(info.value).startswith("start 0.6 must be below end 0.3") and "--" not in str(info.value)
    finally:
        ip.detach()
    image = tmp_path / "p.png"
    random_image(1).save(image)
    # the same check reached through the command line (the embedded world model): flags
    rc = main(["generate", "--image", str(image), "--start", "0.6", "--end", "0.3", "--steps", "1",
               "--device", "cpu", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may print a warning first)
    assert rc == 2 and err == "error: --start 0.6 must be below --end 0.3 (the adapter acts between the two)"
    assert not (tmp_path / "o.png").exists()
