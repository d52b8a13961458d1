"""A full disk while `train` saves a checkpoint: one line naming the folder, the space needed, the last good
checkpoint and --resume (exit 2), and the last good checkpoint left as it was."""

import json

import torch

from textdiffusion.cli.main import main
from textdiffusion.models.checkpoints import newest_good_checkpoint


def test_a_full_disk_while_saving_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, wiki, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki.train[:120]))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up once the first checkpoint is on it
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    code = main(["train", "--preset", "micro", "--dataset", str(docs), "--output-dir", str(run), "--max-length", "32",
                 "--batch-size", "4", "--max-steps", "6", "--eval-steps", "2", "--eval-blocks", "2"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    marker = "textdiffusion train: error:"  # a progress bar may share its line
    line = [x[x.index(marker):] for x in err.splitlines() if marker in x]
    assert len(line) == 1 and "Traceback" not in err, err[-2000:]
    assert "the disk is full" in line[0] and str(run) in line[0] and "MB are free" in line[0]
    assert "checkpoint-2" in line[0] and "--resume" in line[0]
    assert newest_good_checkpoint(run).name == "checkpoint-2"
