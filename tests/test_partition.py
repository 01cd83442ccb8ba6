"""Partitioners, partition statistics, the partition.json record and the partition plots."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from fedjax_cv.data import partition, plots
from tests import real_data

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """2000 single labels over 10 classes of unequal sizes, shuffled."""
    counts = np.arange(1, NUM_CLASSES + 1) * 2000 // 55
    counts[-1] += 2000 - counts.sum()
    return np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), counts))


@pytest.fixture(scope="module")
def annotations() -> list[np.ndarray]:
    """400 detection images: 0-5 boxes each over 8 classes of skewed frequency."""
    rng = np.random.default_rng(1)
    weights = 0.6 ** np.arange(8)
    return [
        rng.choice(8, size=rng.integers(0, 6), p=weights / weights.sum()).astype(np.int32)
        for _ in range(400)
    ]


def _client_ids(n: int) -> np.ndarray:
    return np.asarray([f"user{(i * 7) % 23}" for i in range(n)])


# name -> (multi-label data?, params, num_clients)
CASES = {
    "iid": (False, {}, 10),
    "dirichlet": (False, {"alpha": 0.5}, 10),
    "lda": (False, {"alpha": 0.5}, 10),
    "shards": (False, {"shards_per_client": 2}, 10),
    "lognormal": (False, {"sigma": 1.0}, 10),
    "lda_multilabel": (True, {"alpha": 0.5}, 8),
    "fedcv_detection": (True, {}, 4),
    "natural": (False, None, 23),
}


def _run(name, labels, annotations, seed):
    multilabel, params, num_clients = CASES[name]
    data = annotations if multilabel else labels
    if params is None:
        params = {"client_ids": _client_ids(len(data))}
    return partition.make_partition(name, data, num_clients, seed, **params), len(data)


def test_registry_lists_every_partitioner():
    assert set(partition.PARTITIONERS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_example_in_exactly_one_client(name, labels, annotations):
    clients, num_examples = _run(name, labels, annotations, seed=0)
    assert len(clients) == CASES[name][2]
    assert all(len(c) > 0 for c in clients)
    np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(num_examples))


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_same_partition(name, labels, annotations):
    first, _ = _run(name, labels, annotations, seed=3)
    second, _ = _run(name, labels, annotations, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    "name", ["iid", "dirichlet", "lda", "shards", "lognormal", "lda_multilabel"]
)
def test_other_seed_other_partition(name, labels, annotations):
    first, _ = _run(name, labels, annotations, seed=3)
    second, _ = _run(name, labels, annotations, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_fedcv_detection_seed_breaks_ties():
    # Four classes in ten images each: every greedy step is a four-way (then three-way...) tie.
    annotations = [np.asarray([i // 10]) for i in range(40)]
    partitions = {
        tuple(int(c[0]) // 10 for c in partition.fedcv_detection(annotations, 4, seed))
        for seed in range(10)
    }
    assert len(partitions) > 1
    assert all(sorted(p) == [0, 1, 2, 3] for p in partitions)


def test_natural_ignores_seed(labels):
    ids = _client_ids(len(labels))
    first = partition.natural(labels, 23, 0, client_ids=ids)
    second = partition.natural(labels, 23, 1, client_ids=ids)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_natural_orders_clients_by_first_appearance():
    ids = ["b", "a", "b", "c", "a"]
    clients = partition.natural(np.zeros(5, int), 3, 0, client_ids=ids)
    assert [c.tolist() for c in clients] == [[0, 2], [1, 4], [3]]


ALPHAS = [0.05, 0.1, 0.5, 1, 10, 100, 1000]


def test_dirichlet_emd_falls_as_alpha_grows():
    # 5,000 examples a class; 200 clients of 100 leave the pools far from exhausted, which
    # would otherwise blur the small difference between alpha = 0.05 and 0.1.
    labels = np.repeat(np.arange(NUM_CLASSES), 5000)
    emds = []
    for alpha in ALPHAS:
        clients = partition.dirichlet(labels, 200, 0, alpha=alpha, client_size=100)
        emds.append(partition.mean_emd(partition.label_histograms(labels, clients, NUM_CLASSES)))
    assert np.all(np.diff(emds) < 0), emds
    assert emds[0] > 1.6 and emds[-1] < 0.3  # near one class per client / near identical


def test_lda_emd_falls_as_alpha_grows():
    labels = np.repeat(np.arange(NUM_CLASSES), 5000)
    emds = []
    for alpha in ALPHAS:
        clients = partition.lda(labels, 10, 0, alpha=alpha)
        emds.append(partition.mean_emd(partition.label_histograms(labels, clients, NUM_CLASSES)))
    assert np.all(np.diff(emds) < 0), emds


def test_lda_sizes_vary_and_respect_min_size(labels):
    clients = partition.lda(labels, 10, 0, alpha=0.3, min_client_size=25)
    sizes = [len(c) for c in clients]
    assert min(sizes) >= 25
    assert max(sizes) > 1.5 * min(sizes)
    # `balance`: a client holding n / num_clients examples gets no share of later classes, so
    # it ends below that fair share plus the one class that took it over.
    largest_class = np.bincount(labels).max()
    assert max(sizes) < len(labels) / 10 + largest_class


def test_lda_without_balance_splits_every_class_by_dirichlet_proportions():
    """balance=False: every class is cut over all clients by proportions ~ Dir(alpha * 1).

    Client k's share of a class is then marginally Beta(alpha, (K - 1) alpha): mean 1/K,
    variance v = (1/K)(1 - 1/K) / (K alpha + 1). Over C independent classes, client k's mean
    share has standard deviation sqrt(v / C); the sample variance of all K * C shares has
    relative standard deviation sqrt((kurtosis - 1) / (K C)), kurtosis 5.55 for Beta(1, 9)
    (excess 6 [(a-b)^2 (a+b+1) - ab (a+b+2)] / [ab (a+b+2)(a+b+3)] = 2.55): 4.8% at K C = 2000.
    Both are checked at 5 standard deviations (a false failure about once in 10^6 seeds);
    cutting at floor(cumulative share * n) moves a count by less than one, a share by < 0.01.
    """
    num_clients, num_classes, per_class, alpha = 10, 200, 100, 1.0
    labels = np.repeat(np.arange(num_classes), per_class)
    clients = partition.lda(labels, num_clients, 0, alpha=alpha, min_client_size=10, balance=False)
    np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(len(labels)))
    assert min(len(c) for c in clients) >= 10
    shares = partition.label_histograms(labels, clients, num_classes) / per_class  # [K, C]
    variance = (1 / num_clients) * (1 - 1 / num_clients) / (num_clients * alpha + 1)
    np.testing.assert_allclose(
        shares.mean(axis=1), 1 / num_clients, atol=5 * np.sqrt(variance / num_classes)
    )
    assert abs(shares.var() / variance - 1) < 5 * 0.048
    # Without the cap, some client passes the bound that balance=True keeps (see above):
    # 100 classes of 100 at alpha 0.1 spread client sizes far past 1000 + 100.
    labels = np.repeat(np.arange(100), 100)
    for balance, beyond in ((False, True), (True, False)):
        clients = partition.lda(labels, 10, 0, alpha=0.1, balance=balance)
        assert (max(len(c) for c in clients) >= 1000 + 100) == beyond, balance


def test_dirichlet_gives_every_client_its_size_and_the_population_mean():
    """Client k draws q_k ~ Dir(alpha p), then n labels from q_k. Far from exhausting any class
    (20,000 of 110,000 examples drawn), client k's label frequencies f_k have mean p and, per
    class, variance Var(q_kc) + E[q_kc (1 - q_kc)] / n = p_c (1 - p_c) (1 + alpha / n) /
    (alpha + 1). The mean over K independent clients is within 5 of its standard deviations,
    sqrt(that / K), of p (a false failure about once in 10^6 seeds per class); a partition
    that ignored the prior (Dir(alpha * 1)) would be 28 of them away on class 0 here."""
    counts = np.arange(1, NUM_CLASSES + 1) * 2000
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), counts))
    prior = counts / counts.sum()
    num_clients, size, alpha = 1000, 20, 1.0
    clients = partition.dirichlet(labels, num_clients, 0, alpha=alpha, client_size=size)
    assert [len(c) for c in clients] == [size] * num_clients
    assert len(np.unique(np.concatenate(clients))) == num_clients * size
    frequencies = partition.label_histograms(labels, clients, NUM_CLASSES) / size
    variance = prior * (1 - prior) * (1 + alpha / size) / (alpha + 1)
    np.testing.assert_array_less(
        np.abs(frequencies.mean(axis=0) - prior), 5 * np.sqrt(variance / num_clients)
    )
    # The default size is the split's examples over the clients, for every client.
    clients = partition.dirichlet(labels[:1003], 10, 1, alpha=0.5)
    assert [len(c) for c in clients] == [100] * 10
    # A given class prior replaces the label frequencies: a class it gives no mass is absent.
    skewed = np.array([0.0, 0.5, 0.5] + [0.0] * (NUM_CLASSES - 3))
    clients = partition.dirichlet(labels, 50, 2, alpha=10.0, client_size=20, class_prior=skewed)
    histograms = partition.label_histograms(labels, clients, NUM_CLASSES)
    assert [len(c) for c in clients] == [20] * 50
    assert histograms[:, 0].sum() == 0 and histograms[:, 3:].sum() == 0


@pytest.mark.parametrize(
    "total, weights, expected",
    [
        # 10 - 4 = 6 to share: 1.5 each; floors 1, two left over go to the first two of the
        # four tied remainders (stable order); + the 1 every client gets.
        (10, [1, 1, 1, 1], [3, 3, 2, 2]),
        # 7 - 3 = 4: shares 2/3, 4/3, 2; floors 0, 1, 2; one left over, largest remainder 2/3.
        (7, [1, 2, 3], [2, 2, 3]),
        # Nothing beyond the 1 each: weights do not matter.
        (3, [5.0, 1e-4, 1e-4], [1, 1, 1]),
        # 100 - 3 = 97: 32 1/3 each; one left over to the first of three tied remainders.
        (100, [2, 2, 2], [34, 33, 33]),
        # 20 - 2 = 18: shares 18 * 0.9 = 16.2 and 1.8; floors 16, 1; one left over to the
        # remainder 0.8, not 0.2.
        (20, [9, 1], [17, 3]),
        (5, [0.3], [5]),
    ],
)
def test_apportion_by_hand(total, weights, expected):
    sizes = partition._apportion(total, np.asarray(weights, float))
    assert sizes.tolist() == expected
    assert sizes.sum() == total


def test_shards_by_hand():
    labels = np.asarray([0, 0, 1, 1, 2, 2, 3, 3])
    clients = partition.shards(labels, 2, seed=0, shards_per_client=2)
    shards = {(0, 1), (2, 3), (4, 5), (6, 7)}
    for client in clients:
        assert len(client) == 4
        pairs = {tuple(client[:2]), tuple(client[2:])}
        assert pairs <= shards  # two whole shards: two labels, two examples each
        assert len(set(labels[client])) == 2


def test_shards_uneven_split_covers_everything():
    labels = np.asarray([2, 0, 1, 0, 2, 1, 0])
    clients = partition.shards(labels, 3, seed=1, shards_per_client=2)
    np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(7))


def test_lognormal_sizes():
    labels = np.zeros(1000, int)
    sizes = [len(c) for c in partition.lognormal(labels, 20, 0, sigma=1.5)]
    assert sum(sizes) == 1000 and min(sizes) >= 1 and max(sizes) > 3 * min(sizes)
    equal = [len(c) for c in partition.lognormal(labels, 20, 0, sigma=0.0)]
    assert equal == [50] * 20


def test_lognormal_log_sizes_are_normal_with_scale_sigma():
    """Sizes proportional to LogNormal(0, sigma) draws: log sizes are normal with standard
    deviation sigma up to a shift. 1000 clients of 1000 examples on average keep the smallest
    (the least of 1000 draws, about e^-3.1, over their mean e^0.5: ~30 examples) far enough
    from the rounding to whole examples;
    the sample standard deviation of 1000 normals is within 5 / sqrt(2 * 999) = 11% of sigma,
    and a KS test against the normal rejects at p < 1e-3 once in a thousand seeds."""
    sigma, num_clients = 1.0, 1000
    clients = partition.lognormal(np.zeros(1_000_000, int), num_clients, 0, sigma=sigma)
    log_sizes = np.log([len(c) for c in clients])
    assert abs(log_sizes.std(ddof=1) / sigma - 1) < 5 / np.sqrt(2 * (num_clients - 1))
    standardised = (log_sizes - log_sizes.mean()) / sigma
    assert stats.kstest(standardised, "norm").pvalue > 1e-3


def test_fedcv_detection_by_hand():
    annotations = [[0], [0, 1], [1], [2], [0, 2], []]
    clients = partition.fedcv_detection([np.asarray(a) for a in annotations], 3, seed=0)
    # class 0 is in 3 images, the most: its images go first; classes 1 and 2 then tie at one
    # remaining image each; the last client gets the rest, the image without boxes included.
    assert clients[0].tolist() == [0, 1, 4]
    assert clients[1].tolist() in ([2], [3])
    assert clients[2].tolist() == sorted({2, 3, 5} - set(clients[1].tolist()))


def test_fedcv_detection_covers_every_image(annotations):
    clients = partition.fedcv_detection(annotations, 5, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(len(annotations)))


def test_fedcv_detection_too_many_clients():
    annotations = [np.asarray([0]), np.asarray([1]), np.asarray([], int)]
    with pytest.raises(ValueError, match=r"data\.num_clients=3 .* must be at most 2"):
        partition.fedcv_detection([np.asarray([0]), np.asarray([0]), np.asarray([0])], 3, 0)
    assert len(partition.fedcv_detection(annotations, 3, 0)) == 3


def test_lda_multilabel_invariant_to_class_ids(annotations):
    permutation = np.random.default_rng(5).permutation(8)
    renamed = [permutation[a] for a in annotations]
    first = partition.lda_multilabel(annotations, 8, 2, alpha=0.3, min_client_size=5)
    second = partition.lda_multilabel(renamed, 8, 2, alpha=0.3, min_client_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_mean_emd_by_hand():
    # p = (0.5, 0.5); each client is (0.75, 0.25) or its mirror: L1 distance 0.5 each.
    assert partition.mean_emd(np.asarray([[3, 1], [1, 3]])) == pytest.approx(0.5)
    assert partition.mean_emd(np.asarray([[2, 0], [0, 2]])) == pytest.approx(1.0)
    # p = (0.8, 0.2): client 1 (n=4) is 0.4 away, client 2 (n=1) 1.6: 0.8*0.4 + 0.2*1.6.
    assert partition.mean_emd(np.asarray([[4, 0], [0, 1]])) == pytest.approx(0.64)
    assert partition.mean_emd(np.asarray([[5, 5], [1, 1]])) == pytest.approx(0.0)


def test_label_histograms_multilabel_counts_boxes():
    annotations = [np.asarray([0, 0, 2]), np.asarray([], int), np.asarray([1])]
    histograms = partition.label_histograms(annotations, [np.asarray([0, 1]), np.asarray([2])], 3)
    np.testing.assert_array_equal(histograms, [[2, 0, 1], [0, 1, 0]])


def test_partition_json_round_trip(tmp_path, annotations):
    record = partition.create_partition(
        "lda_multilabel", annotations, 6, 7, num_classes=8, count_boxes=True, alpha=0.5
    )
    path = record.save(tmp_path)
    assert path == tmp_path / "partition.json"
    loaded = partition.Partition.load(path)
    assert loaded == record
    assert loaded.stats == record.stats
    raw = json.loads(path.read_text())
    assert raw["seed"] == 7 and raw["params"] == {"alpha": 0.5}
    assert [len(c) for c in raw["clients"]] == list(record.stats.client_sizes)
    stats = raw["stats"]
    assert stats["num_examples"] == len(annotations) == sum(stats["client_sizes"])
    assert stats["num_boxes"] == sum(len(a) for a in annotations) == sum(stats["client_num_boxes"])
    assert stats["mean_emd"] == record.stats.mean_emd
    assert np.asarray(stats["class_histograms"]).shape == (6, 8)


def test_classification_stats_have_no_boxes(labels):
    record = partition.create_partition("iid", labels, 4, 0)
    assert "num_boxes" not in record.to_json()["stats"]
    assert record.stats.num_examples == len(labels)
    assert record.stats.mean_emd < 0.1


def test_natural_record_leaves_out_array_params(tmp_path, labels):
    ids = _client_ids(len(labels))
    record = partition.create_partition("natural", labels, 23, 0, client_ids=ids)
    assert record.params == {}
    assert partition.Partition.load(record.save(tmp_path / "p.json")) == record


@pytest.mark.parametrize(
    "name, num_clients, params, match",
    [
        ("nope", 2, {}, r"data\.partition\.name='nope' is unknown; known: dirichlet, "),
        ("iid", 0, {}, r"data\.num_clients=0 is not allowed"),
        ("iid", 5000, {}, r"data\.num_clients=5000 is more than the 2000 examples"),
        ("dirichlet", 4, {"alpha": 0}, r"data\.partition\.alpha=0 is not allowed; must be > 0"),
        ("lda", 4, {"alpha": -1.0}, r"data\.partition\.alpha=-1\.0 is not allowed"),
        ("lda", 4, {"alpha": float("nan")}, r"data\.partition\.alpha=nan is not allowed"),
        ("lda", 4, {"alpha": "big"}, r"data\.partition\.alpha='big' is not allowed"),
        ("lda", 4, {"alpha": 1.0, "min_client_size": 600}, r"min_client_size=600 .* at most 500"),
        ("lda", 100, {"alpha": 0.01, "min_client_size": 2, "max_attempts": 5}, r"not reached"),
        ("shards", 4, {"shards_per_client": 0}, r"data\.partition\.shards_per_client=0"),
        ("shards", 4, {"shards_per_client": 501}, r"shards_per_client=501 .* at most 500"),
        ("lognormal", 4, {"sigma": -1}, r"data\.partition\.sigma=-1 is not allowed; must be >= 0"),
        ("natural", 4, {"client_ids": ["a"] * 2000}, r"data\.num_clients=4 .* must be 1"),
        ("natural", 1, {"client_ids": ["a"] * 3}, r"data\.partition\.client_ids has shape \(3,\)"),
    ],
)
def test_bad_parameters_fail_with_one_line(labels, name, num_clients, params, match):
    with pytest.raises(ValueError, match=match) as error:
        partition.make_partition(name, labels, num_clients, 0, **params)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["dirichlet", "lda", "shards"])
def test_single_label_partitioners_refuse_multilabel_data(name, annotations):
    with pytest.raises(ValueError, match=rf"data\.partition\.name='{name}' needs one label"):
        partition.make_partition(name, annotations, 4, 0, **CASES[name][1])


def test_plots_and_table(tmp_path, labels):
    record = partition.create_partition("dirichlet", labels, 10, 0, alpha=0.1)
    histograms = np.asarray(record.stats.class_histograms)
    names = [f"class{c}" for c in range(NUM_CLASSES)]
    heatmap = plots.plot_class_heatmap(histograms, tmp_path / "heatmap.png", names)
    sizes = plots.plot_client_sizes(record.stats.client_sizes, tmp_path / "sub" / "sizes.png")
    for path in (heatmap, sizes):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100
    table = plots.client_table(record.stats, names, max_rows=5)
    lines = table.splitlines()
    assert lines[0].startswith("10 clients, 2000 examples, mean EMD")
    assert len(lines) == 2 + 5 + 1 and lines[-1] == "... 5 more clients"
    top = int(np.argmax(histograms[0]))
    assert f"class{top}:{histograms[0, top]}" in lines[2]


def test_client_order_groups_by_dominant_class():
    histograms = np.asarray([[0, 5], [9, 1], [1, 4], [10, 0]])
    # class 0 first (pure client before mixed), then class 1 (pure before mixed)
    assert plots.client_order(histograms).tolist() == [3, 1, 0, 2]


def test_detection_table_shows_boxes(annotations):
    record = partition.create_partition("fedcv_detection", annotations, 3, 0, count_boxes=True)
    table = plots.client_table(record.stats)
    assert f"{record.stats.num_boxes} boxes" in table.splitlines()[0]


def test_fedcv_detection_on_coco128_labels():
    label_dir = real_data.require("coco128/object_detection/labels/train2017")
    annotations = [
        np.asarray([int(line.split()[0]) for line in p.read_text().splitlines() if line.strip()])
        for p in sorted(label_dir.glob("*.txt"))
    ]
    record = partition.create_partition("fedcv_detection", annotations, 8, 0, count_boxes=True)
    covered = np.sort(np.concatenate(record.clients))
    np.testing.assert_array_equal(covered, np.arange(len(annotations)))
    # The first client holds every image with a person (class 0, COCO's most frequent).
    with_person = [i for i, a in enumerate(annotations) if 0 in a]
    assert record.clients[0].tolist() == with_person
    assert record.stats.num_boxes == sum(len(a) for a in annotations)
