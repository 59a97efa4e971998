"""Defects found by probing the trainer as a user (issue #11): each was a traceback, a hang or a lie.

* the metrics endpoint vanished when ``fit`` returned, before export, prompts, harness and upload;
* a binary (or unreadable) spec file was an application error with a traceback (exit 1);
* resuming a new model shape from an explicit ``checkpoint.uri`` raised torch's ``size mismatch``.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from trainlib import free_port, make_engine


def test_metrics_endpoint_outlives_fit_until_the_stage_closes_it(shards: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("CRUCIBLE_METRICS_PORT", str(port))
    engine = make_engine(shards, tmp_path, training={"maxSteps": 2}, checkpoint={"interval": 2})
    try:
        engine.fit()
        engine.close()  # what every stage does before export, prompts and upload
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "crucible_train_step 2.0" in body
    finally:
        engine.close_metrics()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "preference", "quantize", "data"])
@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\xff\xfe", None], ids=["binary", "directory"])
def test_unreadable_spec_file_is_bad_input_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture, stage: str,
                                                           content: bytes | None) -> None:
    from crucible.trainer.__main__ import main

    spec = tmp_path / "spec.json"
    if content is None:
        spec.mkdir()
    else:
        spec.write_bytes(content)
    assert main([stage, "--spec", str(spec)]) == 2
    err = capsys.readouterr().err + caplog.text  # the data stage logs through logging
    assert "Traceback" not in err and str(spec) in err


def test_new_model_shape_against_an_explicit_checkpoint_says_what_differs(shards: Path, tmp_path: Path) -> None:
    from crucible.trainer.faults import EXIT_BAD_INPUT, SpecError, classify

    first = make_engine(shards, tmp_path, training={"maxSteps": 4}, checkpoint={"interval": 4})
    first.fit()
    first.close()
    first.close_metrics()
    wider = make_engine(shards, tmp_path, training={"maxSteps": 8}, checkpoint={"interval": 4},
                        model={"hiddenSize": 64})
    try:
        with pytest.raises(SpecError) as err:
            wider.fit()
    finally:
        wider.close()
        wider.close_metrics()
    message = str(err.value)
    assert message.startswith("checkpoint.uri: ") and "checkpoints" in message
    assert "mismatch" in message.lower() and "point checkpoint.uri at a new folder" in message
    assert classify(err.value)[0] == EXIT_BAD_INPUT
