"""Shape specs, layer maps, student initialisation from teacher layers, vocabulary checks."""

import pytest
import torch

from kdship.errors import ModelError
from kdship.models import (build_model, check_vocab_compatible, config_from_spec, init_from_teacher, is_shape_spec,
                           parse_shape_spec, uniform_layer_map)


def test_parse_shape_spec_and_errors():
    assert parse_shape_spec("bert:layers=4,hidden=312") == ("bert", {"num_hidden_layers": 4, "hidden_size": 312})
    assert is_shape_spec("bert:layers=4") and not is_shape_spec("org/model") and not is_shape_spec("./dir")
    with pytest.raises(ModelError, match="unknown key 'depth'"):
        parse_shape_spec("bert:depth=4")
    with pytest.raises(ModelError, match="unknown model type 'bort'"):
        config_from_spec("bort:layers=2")
    with pytest.raises(ModelError, match="not divisible by heads"):
        config_from_spec("bert:hidden=30,heads=4")


def test_spec_inherits_unspecified_sizes_from_the_teacher():
    teacher = config_from_spec("bert:layers=6,hidden=64,heads=4,ffn=128,vocab=500")
    student = config_from_spec("bert:layers=3", base=teacher)
    assert (student.num_hidden_layers, student.hidden_size, student.intermediate_size, student.vocab_size) == (
        3, 64, 128, 500)
    assert config_from_spec("bert:layers=2,hidden=32,heads=2", base=teacher).intermediate_size == 128


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == [0, 2, 4, 6]
    assert uniform_layer_map(4, 12) == [0, 3, 6, 9, 12]
    with pytest.raises(ModelError, match="give layer_map"):
        uniform_layer_map(8, 4)


def test_init_from_teacher_copies_every_kth_layer_and_embeddings():
    teacher = build_model("classify", config=config_from_spec("bert:layers=4,hidden=32,heads=2,ffn=64,vocab=99"),
                          label_names=["a", "b"])
    student = build_model("classify", config=config_from_spec("bert:layers=2", base=teacher.config),
                          label_names=["a", "b"])
    copied = init_from_teacher(student, teacher, uniform_layer_map(2, 4))
    s, t = student.state_dict(), teacher.state_dict()
    assert copied == len(s)
    assert torch.equal(s["bert.encoder.layer.0.attention.self.query.weight"],
                       t["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.3.output.dense.weight"])
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])


def test_student_vocabulary_must_cover_the_teacher_tokenizer():
    class Tok:
        def __len__(self):
            return 1000

    with pytest.raises(ModelError, match="vocabulary of 99 tokens but the teacher's tokenizer has 1000"):
        check_vocab_compatible(config_from_spec("bert:vocab=99"), Tok(), "s")


def test_max_tokens_caps_by_every_position_table():
    from transformers import RobertaConfig

    from kdship.models import max_tokens

    bert = config_from_spec("bert:layers=1,max_len=64")
    roberta = RobertaConfig(max_position_embeddings=130, pad_token_id=1)
    assert max_tokens(128, bert) == 64
    assert max_tokens(256, roberta) == 128  # positions start after the padding index
    assert max_tokens(32, bert, roberta) == 32
