"""Heatmap object keys a person can read: no doubled suffix, unique per image row."""

from worker.scoring import ScoringOptions, heatmap_key


def test_heatmap_key_says_what_it_is_without_doubling_the_suffix() -> None:
    options = ScoringOptions()
    key = heatmap_key(options, model_version="v1", image_key="incoming/tool/lot-01/TEST_093.png", image_id=94)
    assert key == "heatmaps/v1/tool/lot-01/TEST_093.94.heatmap.png"
    assert heatmap_key(options, model_version="v1", image_key="incoming/x", image_id=3) == "heatmaps/v1/x.3.heatmap.png"


def test_an_overwritten_object_gets_its_own_heatmap() -> None:
    options = ScoringOptions()
    first = heatmap_key(options, model_version="v1", image_key="incoming/a/b.png", image_id=1)
    second = heatmap_key(options, model_version="v1", image_key="incoming/a/b.png", image_id=2)
    assert first != second
