"""BLIP-style retrieval recalls against hand-computed values."""
import numpy as np
import pytest

from evaluation.metrics import itm_recalls, mean_std, rank_of


def _blip_reference(scores_i2t, scores_t2i, img2txt, txt2img):
    """BLIP's itm_eval loop, with a stable argsort so ties are deterministic."""
    tr = []
    for i, row in enumerate(scores_i2t):
        inds = np.argsort(row, kind="stable")[::-1]
        tr.append(min(np.where(inds == c)[0][0] for c in img2txt[i]))
    ir = []
    for t, row in enumerate(scores_t2i):
        inds = np.argsort(row, kind="stable")[::-1]
        ir.append(np.where(inds == txt2img[t])[0][0])
    return np.array(tr), np.array(ir)


def test_rank_of_tie_rule_higher_index_first():
    row = np.array([0.5, 0.9, 0.5, 0.5])
    # order (BLIP, stable argsort reversed): 1 (0.9), then ties 3, 2, 0
    assert rank_of(row, [1, 3, 2, 0]).tolist() == [0, 1, 2, 3]
    inds = np.argsort(row, kind="stable")[::-1]
    assert inds.tolist() == [1, 3, 2, 0]


def test_itm_recalls_hand_computed_with_uneven_captions():
    # 3 images; image 0 has captions 0,1; image 1 has caption 2; image 2 has captions 3,4,5.
    img2txt = [[0, 1], [2], [3, 4, 5]]
    txt2img = [0, 0, 1, 2, 2, 2]
    s = np.array([
        # t0   t1   t2   t3   t4   t5
        [0.1, 0.8, 0.9, 0.0, 0.0, 0.0],   # img0: best own caption t1 at rank 1 -> hit@5 only
        [0.0, 0.0, 0.7, 0.1, 0.1, 0.1],   # img1: t2 rank 0 -> hit@1
        [0.9, 0.0, 0.0, 0.2, 0.3, 0.1],   # img2: best own t4 rank 1
    ])
    out = itm_recalls(s, s.T, img2txt, txt2img)
    # TR ranks [1, 0, 1] -> R@1 = 1/3, R@5 = R@10 = 1
    assert out["txt_r1"] == pytest.approx(100 / 3)
    assert out["txt_r5"] == pytest.approx(100.0)
    # IR: per caption column ranking over the 3 images.
    # t0: [0.1,0,0.9] img0 rank 1; t1: [0.8,0,0] rank 0; t2: [0.9,0.7,0] img1 rank 1;
    # t3: [0,0.1,0.2] rank 0; t4: [0,0.1,0.3] rank 0; t5: [0,0.1,0.1] tie img1/img2 -> img2 (higher idx) rank 0
    assert out["img_r1"] == pytest.approx(100 * 4 / 6)
    assert out["img_r5"] == pytest.approx(100.0)
    assert out["img_r10"] == pytest.approx(100.0)
    assert out["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert out["img_r_mean"] == pytest.approx((400 / 6 + 200) / 3)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_tie_goes_to_the_higher_index():
    img2txt = [[0], [1]]
    txt2img = [0, 1]
    s = np.ones((2, 2))  # everything tied
    out = itm_recalls(s, s, img2txt, txt2img)
    # image 0: order [1, 0] -> caption 0 at rank 1; image 1: caption 1 at rank 0
    assert out["txt_r1"] == pytest.approx(50.0)
    assert out["img_r1"] == pytest.approx(50.0)


def test_recall_at_10_boundary():
    n = 12
    s = np.zeros((1, n))
    s[0] = np.arange(n, 0, -1)  # caption 0 best ... caption 11 worst
    s_t2i = np.ones((n, 1))
    out = itm_recalls(s, s_t2i, [[10]], [0] * n)  # own caption at rank 10 -> miss at @10
    assert out["txt_r10"] == 0.0
    out = itm_recalls(s, s_t2i, [[9]], [0] * n)
    assert out["txt_r10"] == 100.0 and out["txt_r5"] == 0.0


def test_matches_blip_loop_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    n_img, caps = 30, [1, 2, 3, 5]
    img2txt, txt2img, t = [], [], 0
    for i in range(n_img):
        k = caps[i % len(caps)]
        img2txt.append(list(range(t, t + k)))
        txt2img += [i] * k
        t += k
    s = rng.integers(0, 4, size=(n_img, t)).astype(float)  # many ties
    s2 = rng.integers(0, 4, size=(t, n_img)).astype(float)
    tr, ir = _blip_reference(s, s2, img2txt, txt2img)
    out = itm_recalls(s, s2, img2txt, txt2img)
    for k in (1, 5, 10):
        assert out[f"txt_r{k}"] == pytest.approx(100 * (tr < k).mean())
        assert out[f"img_r{k}"] == pytest.approx(100 * (ir < k).mean())


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        itm_recalls(np.zeros((2, 3)), np.zeros((2, 3)), [[0], [1, 2]], [0, 1, 1])


def test_mean_std():
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


def _hist(*values, every=10):
    return [{"epoch": every * (i + 1), "loss": 1.0, "test": {"r_mean": v}} for i, v in enumerate(values)] + \
        [{"epoch": 1, "loss": 2.0}]  # an epoch without evaluation is skipped


def test_final_rise_hand_values_and_flag():
    from evaluation.report import final_rise, still_rising

    # seed 0: 12 -> 16 (+4, final 16); seed 1: 8 -> 10 (+2, final 10): mean rise 3, std sqrt(2), 3 / 13 of the final
    rise = final_rise({0: _hist(1.0, 12.0, 16.0), 1: _hist(2.0, 8.0, 10.0)})
    assert rise["mean"] == pytest.approx(3.0)
    assert rise["std"] == pytest.approx(2 ** 0.5)
    assert rise["relative"] == pytest.approx(3 / 13)
    assert rise["epochs"] == 10
    assert still_rising(rise) and not still_rising(rise, threshold=0.25)
    # levelled off (and falling) students are not flagged; one evaluation only: no rise known
    assert not still_rising(final_rise({0: _hist(17.8, 17.9), 1: _hist(18.3, 18.3)}))
    assert not still_rising(final_rise({0: _hist(10.0, 8.0)}))
    assert final_rise({0: _hist(10.0)}) is None and not still_rising(None)
