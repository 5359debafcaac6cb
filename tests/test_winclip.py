"""WinCLIP / WinCLIP+ against a tiny random CLIP (both towers) and tiny tokenizer files.

The stand-ins: a BPE vocabulary learnt in the fixture from the prompt words (40 merges), written in
open_clip's ``bpe_simple_vocab_16e6.txt.gz`` layout and as Hugging Face ``vocab.json`` +
``merges.txt``; a 2-block, 64-wide CLIP saved by ``transformers`` (``CLIPModel.save_pretrained``)
and the same tensors renamed into open_clip's naming. What is checked against a direct reference:
the tokenizer (transformers' CLIPTokenizer), both towers (transformers' CLIPModel), the window
index and the window embeddings (a loop that runs the ViT on each window), the prompt ensemble (a
loop over the prompts), the harmonic aggregation (a loop over patches), the zero-shot and few-shot
scores (every scale by loops), and the one-line errors for missing weights and vocabulary.
"""

from __future__ import annotations

import collections
import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from defectscope.backbones.clip import get_clip_spec, load_clip, open_clip_state, random_clip, resolve_clip_weights
from defectscope.backbones.clip_text import CLIPTokenizer, bytes_to_unicode, read_vocab
from defectscope.errors import WeightsNotFoundError
from defectscope.models import FitContext, create_model, load_model
from defectscope.models.foundation.winclip import (
    ANOMALOUS_STATES,
    class_scores,
    NORMAL_STATES,
    TEMPLATES,
    coverage_matrix,
    harmonic_aggregation,
    prompt_ensemble,
    window_index,
)

SIZE = 64  # the tiny CLIP's native size: a 4 x 4 patch grid


def _learn_merges(texts, n_merges=40):
    """A tiny BPE vocabulary learnt from ``texts`` (most frequent pair first; ties by name)."""
    enc = bytes_to_unicode()
    words = collections.Counter()
    for text in texts:
        for word in text.lower().replace(".", " .").split():
            chars = [enc[b] for b in word.encode()]
            words[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Tokenizer files and a tiny CLIP in Hugging Face and open_clip formats."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("clip")
    normal, anomalous = prompt_ensemble("bottle")
    merges = _learn_merges(normal + anomalous)
    tokenizer = CLIPTokenizer(merges)
    gz_dir = root / "open_clip"
    gz_dir.mkdir()
    with gzip.open(gz_dir / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version: tiny\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    (hf_dir / "vocab.json").write_text(json.dumps(tokenizer.encoder))
    (hf_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    spec = get_clip_spec("tiny")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                         vocab_size=spec.vocab_size, max_position_embeddings=spec.context_length, hidden_act="gelu",
                         eos_token_id=tokenizer.eot, bos_token_id=tokenizer.sot, pad_token_id=0),
        vision_config=dict(hidden_size=spec.vision.embed_dim, intermediate_size=4 * spec.vision.embed_dim,
                           num_hidden_layers=spec.vision.depth, num_attention_heads=spec.vision.num_heads,
                           image_size=spec.vision.image_size, patch_size=16, hidden_act="gelu"),
        projection_dim=spec.embed_dim)
    hf = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "embedding" in name:
                p.mul_(20)  # CLIP's embeddings are larger than transformers' initialisation
    hf.save_pretrained(hf_dir, safe_serialization=True)
    # the same tensors in open_clip's naming
    image, text, _ = load_clip(spec, hf_dir / "model.safetensors")
    state = open_clip_state(image, text)
    from safetensors.torch import save_file

    save_file(state, str(gz_dir / "open_clip_model.safetensors"))
    return {"root": root, "hf_dir": hf_dir, "oc_dir": gz_dir, "hf": hf, "tokenizer": tokenizer, "merges": merges,
            "transformers": transformers}


# --- tokenizer and towers -------------------------------------------------------------------------

def test_tokenizer_matches_transformers_and_both_file_layouts(stand_in):
    texts = prompt_ensemble("metal nut")[0][:20] + ["A  Bottle's flaw, 3 scratches!", "bottle" * 40]
    ours_gz = read_vocab(stand_in["oc_dir"] / "bpe_simple_vocab_16e6.txt.gz")
    ours_hf = read_vocab(stand_in["hf_dir"])  # the folder: vocab.json + merges.txt
    assert torch.equal(ours_gz(texts), ours_hf(texts))
    ids = ours_gz(texts)
    assert ids.shape == (len(texts), 77) and (ids[:, 0] == ours_gz.sot).all()
    assert ids[-1, -1] == ours_gz.eot  # cut to the context, the last token the end token
    ref_tok = stand_in["transformers"].CLIPTokenizer(vocab=ours_gz.encoder,
                                                     merges=[tuple(m) for m in stand_in["merges"]])
    for text, row in zip(texts[:-1], ids[:-1]):
        ref = ref_tok(text)["input_ids"]
        assert row[:len(ref)].tolist() == ref and (row[len(ref):] == 0).all()
    assert len(ours_gz.encode("a photo of a bottle.")) < len("a photo of a bottle.")  # merges were used


def test_towers_match_transformers_in_both_formats(stand_in):
    spec = get_clip_spec("tiny")
    hf, tok = stand_in["hf"], stand_in["tokenizer"]
    images = torch.rand(2, 3, SIZE, SIZE)
    ids = tok(["a photo of a damaged bottle.", "a bottle"])
    with torch.no_grad():
        pixels = (images - torch.tensor(spec.vision.mean).view(1, 3, 1, 1)) / torch.tensor(spec.vision.std).view(1, 3, 1, 1)
        ref_img = hf.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = hf.get_text_features(input_ids=ids).pooler_output
        for path in (stand_in["hf_dir"] / "model.safetensors", stand_in["oc_dir"] / "open_clip_model.safetensors"):
            image, text, fmt = load_clip(spec, path)
            emb, patches = image.encode_tokens(image.tokens(images), patches=True)
            assert torch.allclose(emb, ref_img, atol=1e-5), fmt
            assert torch.allclose(text(ids), ref_txt, atol=1e-5), fmt
            emb_cls_only, none = image.encode_tokens(image.tokens(images))
            assert none is None and torch.allclose(emb_cls_only, emb, atol=1e-5)
            assert patches.shape == (2, 16, spec.vision.embed_dim)


# --- windows, prompts, aggregation ----------------------------------------------------------------

def test_window_index_and_embeddings_against_a_loop():
    for h, w, k in ((4, 4, 2), (4, 4, 3), (5, 3, 2), (15, 15, 3)):
        index = window_index((h, w), k)
        rows = []
        for i in range(h - k + 1):
            for j in range(w - k + 1):
                rows.append([0] + [1 + (i + a) * w + (j + b) for a in range(k) for b in range(k)])
        assert index.tolist() == rows
        # anomalib's make_masks (unfold of the patch-id grid) gives the same windows
        unfold = F.unfold(torch.arange(h * w).float().reshape(1, 1, h, w), kernel_size=k).long()[0]
        assert torch.equal(index[:, 1:] - 1, unfold.t())
    torch.manual_seed(1)
    image, _ = random_clip(get_clip_spec("tiny"), text=False)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = image.tokens(images)
        index = window_index((4, 4), 2)
        got = image.encode_windows(tokens, index)
        for n in range(2):
            for w_i, row in enumerate(index.tolist()):
                x = tokens[n:n + 1, row]  # the class token + this window's patches
                for block in image.network.blocks:
                    x = block(x)
                ref = image.network.norm(x)[0, 0] @ image.proj
                assert torch.allclose(got[n, w_i], ref, atol=1e-5)


def test_harmonic_aggregation_against_a_loop():
    torch.manual_seed(2)
    h = w = 5
    for k in (2, 3):
        index = window_index((h, w), k)
        scores = torch.rand(3, index.shape[0]) + 0.01
        got = harmonic_aggregation(scores, coverage_matrix(index, h * w))
        for n in range(3):
            for p in range(h * w):
                covering = [i for i, row in enumerate(index.tolist()) if p + 1 in row[1:]]
                ref = len(covering) / sum(1 / float(scores[n, i]) for i in covering)
                assert abs(float(got[n, p]) - ref) < 1e-5
    # anomalib's docstring example (3 x 3 grid, 2 x 2 windows)
    got = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), coverage_matrix(window_index((3, 3), 2), 9))
    assert torch.allclose(got.reshape(3, 3), torch.tensor([[1.0, 0.8571, 0.75], [0.6667, 0.48, 0.375],
                                                           [0.5, 0.3333, 0.25]]), atol=1e-4)


def test_prompt_ensemble_and_text_embeddings(stand_in):
    normal, anomalous = prompt_ensemble("metal nut")
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES) == 147 and len(anomalous) == len(ANOMALOUS_STATES) * len(TEMPLATES) == 84
    assert "a photo of a flawless metal nut." in normal and "a close-up photo of the metal nut with defect." in anomalous
    assert not set(normal) & set(anomalous)
    model = create_model("winclip", clip_model="tiny", weights=str(stand_in["hf_dir"]), image_size=SIZE)
    model.fit(None, context=FitContext("zero-shot", ("metal_nut",)))
    assert model.class_name == "metal nut"
    hf, tok = stand_in["hf"], stand_in["tokenizer"]
    for row, prompts in enumerate((normal, anomalous)):
        with torch.no_grad():  # transformers' text features of every prompt (zero-padded to 77 tokens)
            features = hf.get_text_features(input_ids=tok(prompts)).pooler_output
        each = [F.normalize(f, dim=0) for f in features]
        ref = F.normalize(sum(each) / len(each), dim=0)
        assert torch.allclose(model.text_embeddings[row], ref, atol=1e-5)


# --- the scores -----------------------------------------------------------------------------------

def _reference_scores(model, images):
    """WinCLIP / WinCLIP+ by loops: every window run alone, every patch scored one by one."""
    enc, text, t = model.image, model.text_embeddings, model.params["temperature"]
    grid = SIZE // 16

    def ascore(z):  # Eq. 1
        sims = torch.stack([F.cosine_similarity(z, text[c], dim=0) for c in (0, 1)]) / t
        return float(sims.softmax(0)[1])

    def assoc(z, memory):  # Eq. 4: the nearest memory entry, any position
        return (1 - float(F.cosine_similarity(z[None], memory, dim=1).max())) / 2

    def window_embedding(tokens, row):
        x = tokens[None, row]
        for block in enc.network.blocks:
            x = block(x)
        return enc.network.norm(x)[0, 0] @ enc.proj

    def harmonic(values):
        return len(values) / sum(1 / v for v in values)

    out_scores, out_maps = [], []
    with torch.no_grad():
        memory = {}
        if model.few_shot:
            for k in model.scales:
                memory[k] = getattr(model, f"memory_windows_{k}")
            memory["patch"] = model.memory_patches
        for img in images:
            tokens = enc.tokens(img[None])[0]
            x = tokens[None]
            for block in enc.network.blocks:
                x = block(x)
            x = enc.network.norm(x)[0]
            a_img = ascore(x[0] @ enc.proj)
            zero = torch.zeros(grid * grid)
            few = torch.zeros(grid * grid)
            per_scale_zero, per_scale_few = [], []
            for k in model.scales:
                rows = window_index((grid, grid), k).tolist()
                embs = [window_embedding(tokens, row) for row in rows]
                z_scores = [ascore(e) for e in embs]
                f_scores = [assoc(e, memory[k]) for e in embs] if model.few_shot else None
                zmap, fmap = torch.zeros(grid * grid), torch.zeros(grid * grid)
                for p in range(grid * grid):
                    cov = [i for i, row in enumerate(rows) if p + 1 in row[1:]]
                    zmap[p] = harmonic([z_scores[i] for i in cov])
                    if model.few_shot:
                        fmap[p] = harmonic([f_scores[i] for i in cov])
                per_scale_zero.append(zmap)
                per_scale_few.append(fmap)
            for p in range(grid * grid):
                zero[p] = harmonic([a_img] + [float(m[p]) for m in per_scale_zero])
            if not model.few_shot:
                out_scores.append(a_img)
                out_maps.append(zero)
                continue
            patch_map = torch.tensor([assoc(x[1 + p], memory["patch"]) for p in range(grid * grid)])
            few = torch.stack(per_scale_few + [patch_map]).mean(0)
            out_scores.append((a_img + float(few.max())) / 2)
            out_maps.append((zero + few) / 2)
    return torch.tensor(out_scores), torch.stack(out_maps).reshape(-1, grid, grid)


def test_zero_shot_fits_on_nothing_and_matches_the_reference(stand_in):
    model = create_model("winclip", clip_model="tiny", weights=str(stand_in["oc_dir"]), image_size=SIZE)
    model.fit(None, context=FitContext("zero-shot", ("bottle",)))
    assert not model.few_shot and model.class_name == "bottle"
    images = torch.rand(3, 3, SIZE, SIZE)
    pred = model.predict(images)
    assert pred.score.shape == (3,) and pred.anomaly_map.shape == (3, SIZE, SIZE)
    assert ((pred.score > 0) & (pred.score < 1)).all()
    with torch.no_grad():
        score, grid_map = model.scores(images)
    ref_score, ref_map = _reference_scores(model, images)
    assert torch.allclose(score, ref_score, atol=1e-5) and torch.allclose(grid_map, ref_map, atol=1e-5)
    assert torch.allclose(pred.score, score)


def test_few_shot_memory_and_scores_against_the_reference(stand_in, tmp_path):
    torch.manual_seed(3)
    refs, images = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    model = create_model("winclip", clip_model="tiny", weights=str(stand_in["hf_dir"]), image_size=SIZE,
                         class_name="widget", batch_size=1)
    model.fit(_Images(refs), context=FitContext("few-shot", ("bottle",)))
    assert model.few_shot and model.class_name == "widget"
    assert model.memory_patches.shape == (2 * 16, 64)
    assert model.memory_windows_2.shape == (2 * 9, 32) and model.memory_windows_3.shape == (2 * 4, 32)
    with torch.no_grad():
        score, grid_map = model.scores(images)
        ref_score, ref_map = _reference_scores(model, images)
        assert torch.allclose(score, ref_score, atol=1e-5) and torch.allclose(grid_map, ref_map, atol=1e-5)
        # a reference image is its own nearest neighbour: its visual scores are 0, its score ascore_0 / 2
        self_score, _ = model.scores(refs[:1])
        emb = model.image.encode_tokens(model.image.tokens(refs[:1]))[0]
        assert torch.allclose(self_score, class_scores(emb, model.text_embeddings, 0.07) / 2, atol=1e-5)
    two = create_model("winclip", clip_model="tiny", weights=str(stand_in["hf_dir"]), image_size=SIZE, k_shot=1)
    assert two.fit(_Images(refs)).memory_patches.shape == (16, 64)  # the first k_shot images only
    assert not create_model("winclip", clip_model="tiny", weights=str(stand_in["hf_dir"]), image_size=SIZE,
                            k_shot=0).fit(_Images(refs)).few_shot
    model.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.few_shot and back.class_name == "widget"
    assert torch.equal(back.predict(images).score, model.predict(images).score)


# --- errors ---------------------------------------------------------------------------------------

def test_missing_weights_and_vocabulary_are_one_line_errors(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DEFECTSCOPE_ALLOW_DOWNLOAD", raising=False)
    model = create_model("winclip")
    ok, note = model.weights_available()
    assert not ok and "open_clip_model.safetensors" in note
    for call in (model.check_weights, lambda: model.fit(None)):
        with pytest.raises(WeightsNotFoundError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "open_clip_model.safetensors" in message
        assert "timm/vit_base_patch16_plus_clip_240.laion400m_e31" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_clip_weights(get_clip_spec("ViT-B-16"), tmp_path / "nope.safetensors")
    with pytest.raises(WeightsNotFoundError, match="no pretrained weights"):
        create_model("winclip", clip_model="tiny", image_size=SIZE).fit(None)
    # weights without a vocabulary beside them, and no package that ships one
    import defectscope.backbones.clip_text as clip_text

    monkeypatch.setattr(clip_text, "packaged_vocab", lambda: None)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.safetensors").write_bytes((stand_in["hf_dir"] / "model.safetensors").read_bytes())
    model = create_model("winclip", clip_model="tiny", weights=str(lonely / "model.safetensors"), image_size=SIZE)
    for call in (model.check_weights, lambda: model.fit(None)):
        with pytest.raises(WeightsNotFoundError) as info:
            call()
        assert "\n" not in str(info.value) and "bpe_simple_vocab_16e6.txt.gz" in str(info.value)
    assert not model.weights_available()[0]
    with pytest.raises(WeightsNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        create_model("winclip", clip_model="tiny", weights=str(lonely / "model.safetensors"), image_size=SIZE,
                     vocab=str(tmp_path / "missing.txt.gz")).fit(None)
    # with vocab= given, the same weights work
    create_model("winclip", clip_model="tiny", weights=str(lonely / "model.safetensors"), image_size=SIZE,
                 vocab=str(stand_in["hf_dir"] / "vocab.json")).fit(None)
    # a file of another architecture: one line naming what differs
    from defectscope.backbones.weights import WeightsFileError

    with pytest.raises(WeightsFileError) as info:
        create_model("winclip", clip_model="ViT-B-16", weights=str(stand_in["oc_dir"]),
                     vocab=str(stand_in["hf_dir"])).fit(None)
    assert "\n" not in str(info.value) and "wrong shapes" in str(info.value)


def test_parameters_are_checked():
    from defectscope.models.params import ParamError

    with pytest.raises(ParamError, match="multiple of the CLIP patch size"):
        create_model("winclip", image_size=250)
    with pytest.raises(ParamError, match="does not fit"):
        create_model("winclip", clip_model="tiny", image_size=32)
    with pytest.raises(ParamError, match="whole numbers"):
        create_model("winclip", scales="2.5")
    model = create_model("winclip", clip_model="tiny", pretrained=False, image_size=SIZE).fit(None)
    with pytest.raises(Exception, match="64x64"):
        model.predict(torch.rand(1, 3, 2 * SIZE, 2 * SIZE))
