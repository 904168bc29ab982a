"""The popularity arm's scores: log(1 + clicks) per item of the catalog it ranks."""

import math

import torch

from services.catalog import Catalog
from services.data import Item
from serving.popularity import LivePopularity


def test_scores_follow_the_counts_on_any_catalog_version_and_are_fresh_tensors():
    popularity = LivePopularity("unused")
    catalog = Catalog([Item(item_id=i, title=i) for i in ("a", "b", "c")], torch.zeros(3, 4))
    popularity.counts = {"b": 9, "gone": 5}  # an item the catalog does not have is ignored
    scores = popularity.scores(catalog)
    assert [round(v, 5) for v in scores.tolist()] == [0.0, round(math.log1p(9), 5), 0.0]
    scores[1] = float("-inf")  # a request masks its copy in place
    assert popularity.scores(catalog)[1] > 0
