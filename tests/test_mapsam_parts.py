"""MapSAM's parts: automatic prompts at the argmax/argmin pixels, masked attention (all-ones = unmasked, a fully masked
row falls back, masked keys get no weight, the official double softmax on request), the decoder without masks
equals SAM's ``predict_masks``, focal + Dice."""

import math

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention

from dgkit.methods.mapsam_parts import SPGen, attend, automatic_points, decode, dice_loss, focal_loss, mapsam_loss


def test_automatic_points_are_the_argmax_and_argmin_pixels_in_xy():
    coarse = torch.zeros(2, 1, 8, 12)
    coarse[0, 0, 1, 7], coarse[0, 0, 5, 2] = 5.0, 4.0  # top-2 of image 0: (row 1, col 7), (row 5, col 2)
    coarse[0, 0, 6, 10], coarse[0, 0, 0, 0] = -5.0, -4.0  # bottom-2
    coarse[1, 0, 3, 3], coarse[1, 0, 7, 11], coarse[1, 0, 2, 9], coarse[1, 0, 4, 1] = 3.0, 2.0, -3.0, -2.0
    coords, labels = automatic_points(coarse, (8, 12), k=2)
    assert coords.tolist()[0] == [[7, 1], [2, 5], [10, 6], [0, 0]]  # (x, y) = (column, row)
    assert coords.tolist()[1] == [[3, 3], [11, 7], [9, 2], [1, 4]]
    assert labels.tolist() == [[1, 1, 0, 0]] * 2
    # from a lower resolution: the extreme pixels of the bilinearly upsampled map
    low = torch.randn(1, 1, 4, 4)
    coords, _ = automatic_points(low, (16, 16), k=1)
    up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    top, bottom = divmod(int(up.argmax()), 16), divmod(int(up.argmin()), 16)
    assert coords[0].tolist() == [[top[1], top[0]], [bottom[1], bottom[0]]]


def _attention() -> Attention:
    torch.manual_seed(0)
    return Attention(16, 2, downsample_rate=2)


def test_all_ones_mask_equals_unmasked_attention():
    attn = _attention()
    q, k = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    with torch.no_grad():
        ref = attn(q=q, k=k, v=k)  # segment-anything's own forward
        torch.testing.assert_close(attend(attn, q, k, k), ref)
        torch.testing.assert_close(attend(attn, q, k, k, torch.ones(2, 9, dtype=torch.bool)), ref)


def test_fully_masked_row_falls_back_to_unmasked_and_masked_keys_get_no_weight():
    attn = _attention()
    q, k = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[1, [0, 4, 5]] = True  # image 0: every key masked; image 1: three keys kept
    with torch.no_grad():
        out = attend(attn, q, k, k, keep)
        ref = attn(q=q, k=k, v=k)
        torch.testing.assert_close(out[0], ref[0])  # fallback
        sub = attn(q=q[1:], k=k[1:, [0, 4, 5]], v=k[1:, [0, 4, 5]])  # attention over the kept keys only
        torch.testing.assert_close(out[1:], sub)
        assert torch.isfinite(out).all()
        per_query = keep[:, None].expand(2, 5, 9).clone()
        per_query[1, 2] = False  # one fully masked query row of image 1 falls back alone
        out3 = attend(attn, q, k, k, per_query)
        torch.testing.assert_close(out3[1, 2], ref[1, 2])
        torch.testing.assert_close(out3[1, 3], sub[0, 3])


def test_double_softmax_flag_reproduces_the_official_computation():
    attn = _attention()
    q, k = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    keep = torch.tensor([[True, False, True, True, False, True]])
    with torch.no_grad():
        out = attend(attn, q, k, k, keep, double_softmax=True)
        qh = attn.q_proj(q).reshape(1, 3, 2, 4).transpose(1, 2)
        kh = attn.k_proj(k).reshape(1, 6, 2, 4).transpose(1, 2)
        vh = attn.v_proj(k).reshape(1, 6, 2, 4).transpose(1, 2)
        p = (qh @ kh.transpose(-2, -1) / math.sqrt(4)).softmax(-1)
        p = (p + torch.where(keep, 0.0, -1e9)[:, None, None]).softmax(-1)
        expected = attn.out_proj((p @ vh).transpose(1, 2).reshape(1, 3, 8))
        torch.testing.assert_close(out, expected)
        assert not torch.allclose(out, attend(attn, q, k, k, keep))  # differs from one softmax


def _sam_decoder(c: int = 32, grid: int = 4):
    torch.manual_seed(0)
    pe = PromptEncoder(
        embed_dim=c, image_embedding_size=(grid, grid), input_image_size=(16 * grid,) * 2, mask_in_chans=4
    )
    dec = MaskDecoder(
        transformer_dim=c,
        transformer=TwoWayTransformer(depth=2, embedding_dim=c, mlp_dim=64, num_heads=2),
        num_multimask_outputs=0,
        iou_head_hidden_dim=c,
    )
    return pe, dec


def test_decoder_without_masks_equals_sams_predict_masks_and_masks_change_it():
    pe, dec = _sam_decoder()
    emb = torch.randn(1, 32, 4, 4)
    coarse = torch.randn(1, 1, 4, 4)
    points = automatic_points(coarse, (64, 64))
    with torch.no_grad():
        sparse, dense = pe(points=points, boxes=None, masks=None)
        assert sparse.shape == (1, 5, 32)  # 4 points + SAM's padding point
        image_pe = pe.get_dense_pe()
        ref = dec.predict_masks(emb, image_pe, sparse, dense)[0][:, :1]
        out = decode(dec, emb, image_pe, sparse, dense)
        torch.testing.assert_close(out, ref)
        assert out.shape == (1, 1, 16, 16)
        keep = (coarse.sigmoid() >= 0.5).flatten(1)
        masked = decode(dec, emb, image_pe, sparse, dense, keep, torch.randn(1, 32), masked_attention=True)
        assert torch.isfinite(masked).all() and not torch.allclose(masked, out)


def test_spgen_and_loss():
    head = SPGen(64)
    assert head(torch.randn(2, 64, 4, 4)).shape == (2, 1, 4, 4)
    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 2:6] = 1
    perfect = target[:, None] * 40 - 20  # confident and right
    assert dice_loss(perfect, target[:, None]) < 1e-6 and focal_loss(perfect, target[:, None]) < 1e-6
    logits = torch.randn(2, 1, 8, 8)
    t = target[:, None]
    p = logits.sigmoid()
    expected_dice = (1 - 2 * (p * t).flatten(1).sum(1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1))).mean()
    torch.testing.assert_close(dice_loss(logits, t), expected_dice, atol=1e-5, rtol=0)
    out = mapsam_loss(logits, torch.randn(2, 1, 2, 2), target)
    assert set(out) == {"loss", "final", "coarse"}
    torch.testing.assert_close(out["final"], 0.2 * focal_loss(logits, t) + 0.8 * dice_loss(logits, t))
    torch.testing.assert_close(out["loss"], out["final"] + out["coarse"])
