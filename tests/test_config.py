"""The schema is the single source of truth: YAML, Make variables and flags derive from it."""

import dataclasses

import pytest

from glmtune import config as cfg
from glmtune.cli import build_parser, config_from_args
from glmtune.errors import ConfigError, GlmtuneError


def parse(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]), cfg.TrainConfig)


def test_every_field_has_a_flag_and_help():
    parser = build_parser()
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(cfg.TrainConfig):
        assert cfg.cli_flag(f) in train_help, f.name
        assert f.metadata["help"], f.name


def test_required_flag_spellings_exist():
    flags = {cfg.cli_flag(f) for f in dataclasses.fields(cfg.TrainConfig)}
    for flag in ("--max-samples", "--epochs", "--batch-size", "--grad-accum", "--lr", "--lora-r",
                 "--lora-alpha", "--lora-dropout", "--max-seq-len", "--threads", "--seed",
                 "--model", "--data", "--val-data", "--output-dir", "--trust-remote-code"):
        assert flag in flags


def test_make_variables_map_to_fields():
    make = cfg.make_variables(cfg.TrainConfig)
    expected = {"MODEL": "model", "DATA": "data", "VAL_DATA": "val_data", "OUTPUT_DIR": "output_dir",
                "MAX_SAMPLES": "max_samples", "NUM_EPOCHS": "epochs", "BATCH_SIZE": "batch_size",
                "GRAD_ACCUM": "grad_accum", "LEARNING_RATE": "lr", "LORA_R": "lora_r",
                "MAX_SEQ_LEN": "max_seq_len", "QUANT_LEVEL": "quant", "NUM_THREADS": "threads"}
    for var, name in expected.items():
        assert make[var] == name


def test_precedence_defaults_yaml_make_flags(tmp_path, monkeypatch):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 2\nbatch_size: 4\nlora_r: 4\nlr: 0.01\n")
    monkeypatch.setenv("BATCH_SIZE", "8")
    monkeypatch.setenv("LORA_R", "12")
    config = parse(["--config", str(yaml_file), "--from-make", "--lora-r", "32"])
    assert config.epochs == 2.0          # YAML over default
    assert config.batch_size == 8        # Make over YAML
    assert config.lora_r == 32           # flag over Make
    assert config.lr == 0.01
    assert config.seed == cfg.TrainConfig().seed  # untouched default


def test_make_environment_is_ignored_without_from_make(monkeypatch):
    monkeypatch.setenv("BATCH_SIZE", "3")
    assert parse([]).batch_size == cfg.TrainConfig().batch_size


def test_yaml_reports_every_problem_at_once(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("epoch: 3\nbatch_size: two\nlr: -1\nlora_dropout: 1.5\nquant: 3bit\n")
    with pytest.raises(ConfigError) as info:
        parse(["--config", str(yaml_file)])
    text = str(info.value)
    assert "epoch: unknown key" in text and "did you mean 'epochs'" in text
    assert "batch_size: expected an integer, got 'two'" in text
    assert str(yaml_file) in text
    # type errors stop before value checks, so a second run reports the rest
    yaml_file.write_text("lr: -1\nlora_dropout: 1.5\nquant: 3bit\nbatch_size: 0\n")
    with pytest.raises(ConfigError) as info:
        parse(["--config", str(yaml_file)])
    assert len(info.value.problems) == 4


def test_invalid_yaml_names_line(tmp_path):
    yaml_file = tmp_path / "broken.yaml"
    yaml_file.write_text("epochs: 2\nbatch_size: [1,\n")
    with pytest.raises(GlmtuneError, match=r"broken.yaml:\d+: invalid YAML"):
        parse(["--config", str(yaml_file)])


def test_yaml_must_be_mapping(tmp_path):
    yaml_file = tmp_path / "list.yaml"
    yaml_file.write_text("- 1\n- 2\n")
    with pytest.raises(GlmtuneError, match="expected a mapping"):
        parse(["--config", str(yaml_file)])


def test_bad_flag_value_is_a_config_error():
    with pytest.raises(ConfigError, match="--batch-size"):
        parse(["--batch-size", "x"])


def test_optional_fields_accept_none_strings(monkeypatch):
    monkeypatch.setenv("MAX_SAMPLES", "none")
    assert parse(["--from-make"]).max_samples is None


def test_val_data_auto_uses_sibling(tmp_path):
    (tmp_path / "train_x.jsonl").write_text("{}\n")
    config = cfg.TrainConfig(data=str(tmp_path / "train_x.jsonl"))
    assert config.resolved_val_data is None
    (tmp_path / "val_x.jsonl").write_text("{}\n")
    assert config.resolved_val_data == str(tmp_path / "val_x.jsonl")
    assert cfg.TrainConfig(data="mine.jsonl").resolved_val_data is None
    assert cfg.TrainConfig(val_data="").resolved_val_data is None


def test_yaml_booleans_work_for_auto_true_false_options(tmp_path):
    yaml_file = tmp_path / "b.yaml"
    yaml_file.write_text("bf16: false\ntrain_embeddings: true\n")
    config = parse(["--config", str(yaml_file)])
    assert (config.bf16, config.train_embeddings) == ("false", "true")


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_eight_bit_weights_with_a_sharding_strategy_are_refused(strategy):
    problems = cfg.TrainConfig(quant="8bit", strategy=strategy).problems()
    assert any(p.startswith(f"strategy: {strategy} shards the weights") and "--quant 4bit" in p
               for p in problems)
    assert not any("shards" in p for p in cfg.TrainConfig(quant="8bit", strategy="zero2").problems())


def test_strategy_auto_follows_the_accelerate_launch_environment(monkeypatch):
    from glmtune.train.distributed import resolve_strategy

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_strategy("auto") == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert resolve_strategy("auto") == "zero2"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert resolve_strategy("auto") == "zero3"
    assert resolve_strategy("fsdp") == "fsdp"  # an explicit choice wins


def test_type_and_value_problems_are_reported_together(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("epochs: -1\nbatch_size: 0\nlr: zero\n")
    with pytest.raises(ConfigError) as caught:
        parse(["--config", str(yaml_file)])
    about = sorted(p.split(":", 1)[0] for p in caught.value.problems)
    assert about == ["batch_size", "epochs", "lr"]
    assert all(str(yaml_file) in p for p in caught.value.problems)


def test_flags_report_type_and_value_problems_together():
    with pytest.raises(ConfigError) as caught:
        parse(["--epochs", "-1", "--lr", "zero"])
    assert sorted(p.split(":", 1)[0] for p in caught.value.problems) == ["epochs", "lr"]


def test_keys_from_hf_and_llama_factory_configs_are_read_as_ours(tmp_path, caplog):
    yaml_file = tmp_path / "hf.yaml"
    yaml_file.write_text("learning_rate: 1.0e-4\nnum_train_epochs: 2\nper_device_train_batch_size: 4\n"
                         "gradient_accumulation_steps: 8\ncutoff_len: 512\nlora_rank: 8\n")
    with caplog.at_level("INFO", logger="glmtune"):
        config = parse(["--config", str(yaml_file)])
    assert (config.lr, config.epochs, config.batch_size, config.grad_accum, config.max_seq_len,
            config.lora_r) == (1e-4, 2, 4, 8, 512, 8)
    assert "read 'learning_rate' as 'lr'" in caplog.text


@pytest.mark.parametrize("text, message", [("lr: 1.0e-3\nlearning_rate: 1.0e-4\n", "learning_rate: sets lr"),
                                           ("learning_rate: 1.0e-4\nlr: 1.0e-3\n", "lr: sets lr")])
def test_an_alias_and_our_own_key_for_the_same_field_are_refused(text, message, tmp_path):
    yaml_file = tmp_path / "both.yaml"
    yaml_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse(["--config", str(yaml_file)])
