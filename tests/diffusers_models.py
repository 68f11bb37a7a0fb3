"""Tiny random-weight diffusers models and inputs for the patch / Skip-Cache tests,
built locally (no downloads): HunyuanDiT2DModel, DiTTransformer2DModel,
PixArtTransformer2DModel, LatteTransformer3DModel, and a whole HunyuanDiTPipeline with
tiny BERT / T5 text encoders, tokenizers made from an in-memory vocabulary, a tiny VAE
(8x downsampling, as the pipeline's rotary grid assumes) and the DDPM scheduler.

They build on every diffusers release skipdit_fast supports (0.30.0 to 0.42.1) and on
transformers 4 and 5 (`make compat` runs both ends)."""

from __future__ import annotations

import inspect
import os
import tempfile

import torch

HY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8,
          hidden_size=32, cross_attention_dim=32, cross_attention_dim_t5=24, pooled_projection_dim=16,
          text_len=5, text_len_t5=7)


def hunyuan(num_layers=6, seed=0, **kw):
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(seed)
    return HunyuanDiT2DModel(num_layers=num_layers, **{**HY, **kw}).eval()


def rotary(head_dim: int, grid: int):
    """HunyuanDiT's 2-D rotary embedding (cos, sin) for a grid x grid image, as torch
    tensors (releases before 0.31 return them without being asked, later ones want
    output_type="pt")."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    kw = {"output_type": "pt"} if "output_type" in inspect.signature(get_2d_rotary_pos_embed).parameters else {}
    return get_2d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid), **kw)


def hunyuan_inputs(batch=2, t=500.0, seed=0, text_len=5, text_len_t5=7, size=8, dtype=torch.float32,
                   device="cpu", padded=False):
    """(hidden_states, timestep, kwargs) the way HunyuanDiTPipeline calls the model."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask5 = torch.ones(batch, text_len_t5, dtype=torch.long)
    if padded:
        mask[:, -2:] = 0
        mask5[:, -3:] = 0
    grid = size // HY["patch_size"]
    kw = dict(
        encoder_hidden_states=torch.randn(batch, text_len, HY["cross_attention_dim"], generator=g),
        text_embedding_mask=mask,
        encoder_hidden_states_t5=torch.randn(batch, text_len_t5, HY["cross_attention_dim_t5"], generator=g),
        text_embedding_mask_t5=mask5,
        image_meta_size=torch.tensor([[size * 8, size * 8, size * 8, size * 8, 0, 0]] * batch, dtype=torch.float32),
        style=torch.zeros(batch, dtype=torch.long),
        image_rotary_emb=rotary(HY["attention_head_dim"], grid),
        return_dict=False)
    x = torch.randn(batch, 4, size, size, generator=g)
    tt = torch.full((batch,), float(t))

    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, tuple):
            return tuple(mv(a) for a in v)
        return v

    return mv(x), mv(tt), {k: mv(v) for k, v in kw.items()}


def dit(num_layers=2, seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def dit_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                class_labels=torch.randint(0, 10, (batch,), generator=g), return_dict=False)


def pixart(num_layers=2, seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=num_layers, cross_attention_dim=32, caption_channels=24,
                                    sample_size=8, patch_size=2, norm_type="ada_norm_single",
                                    num_embeds_ada_norm=1000, use_additional_conditions=False).eval()


def pixart_inputs(batch=2, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(batch, 6, 24, generator=g),
              timestep=torch.randint(0, 1000, (batch,), generator=g),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    if masked:
        mask = torch.ones(batch, 6)
        mask[:, -2:] = 0
        kw["encoder_attention_mask"] = mask
    return kw


def latte(num_layers=2, seed=0):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=num_layers, cross_attention_dim=32, caption_channels=24,
                                   sample_size=8, patch_size=2, video_length=3, norm_type="ada_norm_single",
                                   num_embeds_ada_norm=1000).eval()


def latte_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 3, 8, 8, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 24, generator=g), return_dict=False)


WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "the", "on", "mat", "green", "sky"]


def _tokenizers(vocab: dict[str, int], t5_vocab: list[tuple[str, float]]):
    """A BERT WordPiece and a T5 Unigram tokenizer from in-memory vocabularies:
    transformers 5 builds both from the vocabularies; transformers 4 wants a BERT vocab
    file and builds T5 (a sentencepiece model there) as a fast tokenizer instead."""
    import transformers
    from transformers import BertTokenizer

    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers import T5Tokenizer

        return (BertTokenizer(vocab=vocab, model_max_length=77),
                T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=256))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    path = os.path.join(tempfile.mkdtemp(prefix="bert-vocab-"), "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{w}\n" for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    t5 = Tokenizer(models.Unigram(t5_vocab, unk_id=2))
    t5.pre_tokenizer = pre_tokenizers.Metaspace()
    t5.decoder = decoders.Metaspace()
    return (BertTokenizer(path, model_max_length=77),
            T5TokenizerFast(tokenizer_object=t5, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            extra_ids=0, model_max_length=256))


def hunyuan_pipeline(num_layers=10, seed=0):
    """A whole HunyuanDiTPipeline, tiny and random (BERT: text_len 77, T5: 256 tokens,
    as the pipeline pads them). Call it with height = width = 64 and
    use_resolution_binning=False (the pipeline otherwise resizes to 1024 px)."""
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    text_encoder = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=80),
                             add_pooling_layer=False).eval()
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    tokenizer, tokenizer_2 = _tokenizers(vocab, t5_vocab)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=24, d_kv=8, d_ff=37, num_layers=1,
                                             num_heads=3, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=64).eval()
    transformer = hunyuan(num_layers=num_layers, seed=seed, text_len=77, text_len_t5=256)
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, steps=20, seed=0, guidance_scale=5.0, output_type="np"):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red cat on the mat", negative_prompt="a blue dog", height=64, width=64,
                num_inference_steps=steps, guidance_scale=guidance_scale, generator=g, output_type=output_type,
                use_resolution_binning=False).images


def psnr(a, b, peak=1.0) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)
