"""SafeCLIP's augmentations: the image pipeline, EDA's four operations, and where WordNet comes from."""
import os
import pickle
import random
import zipfile
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from open_clip_safe import augment
from open_clip_safe.augment import (EdaAugmenter, WordNetMissing, blur_kernel_size, clean_caption, image_augment_like,
                                    load_wordnet, safeclip_image_augment)

CAPTION = "A photo of a red car parked near the old house by the river at night"


@pytest.fixture(scope="module")
def eda(wordnet):
    return EdaAugmenter()


def test_blur_kernel_is_a_tenth_of_the_image_and_odd():
    assert [blur_kernel_size(size) for size in (224, 32, 64, 256, 8)] == [21, 3, 5, 25, 3]


def test_image_augment_takes_size_and_normalisation_from_open_clips_preprocess():
    preprocess = open_clip.image_transform(48, is_train=True, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    augment_view = image_augment_like(preprocess)
    names = [type(t).__name__ for t in augment_view.transforms]
    assert names[1:] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale",
                         "SeparableGaussianBlur", "Normalize"]
    crop, jitter, grey, blur, normalize = (augment_view.transforms[i] for i in (1, 3, 4, 5, 6))
    assert crop.size == (48, 48) and crop.scale == (0.08, 1.0) and blur.kernel_size == 3 and blur.sigma == (0.1, 2.0)
    assert image_augment_like(preprocess, crop_scale=0.5).transforms[1].scale == (0.5, 1.0)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], transforms.ColorJitter) and grey.p == 0.2
    assert tuple(normalize.mean) == (0.1, 0.2, 0.3) and tuple(normalize.std) == (0.5, 0.5, 0.5)


def test_image_views_differ_and_repeat_under_a_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA")
    make_view = safeclip_image_augment(32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    torch.manual_seed(0)
    first, second = make_view(image), make_view(image)
    torch.manual_seed(0)
    again = make_view(image)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, again)


def test_clean_caption_keeps_lower_case_letters_only():
    assert clean_caption("A Dog's 3 toys--RED!\tok") == "a dogs toys red ok"
    assert clean_caption("1234 ...") == ""


def test_wordnet_synonyms_of_common_words(eda):
    assert "automobile" in eda.synonyms("car")
    assert "puppy" in eda.synonyms("dog") or "domestic dog" in eda.synonyms("dog")
    assert "car" not in eda.synonyms("car")
    assert eda.synonyms("zzxq") == []


def test_same_seed_same_caption_and_seeds_vary(eda):
    outputs = [eda(CAPTION, seed) for seed in range(20)]
    assert outputs == [eda(CAPTION, random.Random(seed)) for seed in range(20)]
    assert len(set(outputs)) > 10


def test_one_operation_per_caption_chosen_uniformly(eda, monkeypatch):
    chosen = Counter()
    for name in EdaAugmenter.OPERATIONS:
        original = getattr(eda, name)
        monkeypatch.setattr(eda, name, lambda words, rng, name=name, original=original: (chosen.update([name]),
                                                                                       original(words, rng))[1])
    for seed in range(400):
        eda(CAPTION, seed)
    assert sum(chosen.values()) == 400
    assert all(70 < chosen[name] < 130 for name in EdaAugmenter.OPERATIONS), chosen


def test_synonym_replacement_replaces_n_content_words_with_synonyms(eda):
    words = clean_caption(CAPTION).split()  # 15 words: n = 1
    for seed in range(20):
        out = eda.synonym_replacement(words, random.Random(seed))
        changed = [(old, new) for old, new in zip(words, out) if old != new]
        assert len(out) == len(words) and len(changed) == 1
        old, new = changed[0]
        assert old not in eda.stop_words and new in eda.synonyms(old)
    many = ("car dog house river " * 5).split()  # 20 words: n = 2 distinct words, every occurrence replaced
    out = eda.synonym_replacement(many, random.Random(0))
    assert len({old for old, new in zip(many, out) if old != new}) == 2
    assert len(set(out) - set(many)) == 2


def test_random_insertion_adds_synonyms_and_keeps_the_rest_in_order(eda):
    words = clean_caption(CAPTION).split()
    out = eda.random_insertion(words, random.Random(3))
    assert len(out) == len(words) + 1
    rest = iter(out)
    assert all(word in rest for word in words)  # the original words are a subsequence
    inserted = list(out)
    for word in words:
        inserted.remove(word)
    assert any(inserted[0] in eda.synonyms(word) for word in words)


def test_random_swap_permutes_n_pairs(eda):
    words = [f"w{i}" for i in range(30)]  # n = 3 swaps
    for seed in range(10):
        out = eda.random_swap(words, random.Random(seed))
        assert sorted(out) == sorted(words)
        assert sum(a != b for a, b in zip(out, words)) <= 6
    assert any(eda.random_swap(words, random.Random(seed)) != words for seed in range(5))


def test_random_deletion_drops_about_a_tenth_and_never_everything(eda):
    words = [f"w{i}" for i in range(1000)]
    out = eda.random_deletion(words, random.Random(0))
    assert 850 < len(out) < 950 and out == [w for w in words if w in set(out)]
    assert eda.random_deletion(["dog"], random.Random(0)) == ["dog"]
    everything_goes = EdaAugmenter(p_delete=1.0, wordnet=eda._wordnet)
    assert len(everything_goes.random_deletion(["a", "b", "c"], random.Random(0))) == 1


def test_captions_never_come_back_empty(eda):
    for seed, caption in enumerate(["a", "Dog!", "the of and", "12 34", "", "A b"] * 20):
        out = eda(caption, seed)
        assert out.strip() or not caption.strip()
    assert eda("12 34", 0) == "12 34"  # nothing to augment: the raw caption


def test_augmenter_pickles_for_dataloader_workers(eda):
    copy = pickle.loads(pickle.dumps(eda))
    assert len(pickle.dumps(eda)) < 1000  # the WordNet reader is not shipped to workers
    assert [copy(CAPTION, seed) for seed in range(5)] == [eda(CAPTION, seed) for seed in range(5)]


def test_no_wordnet_anywhere_is_a_clear_error(tmp_path):
    with pytest.raises(WordNetMissing) as error:
        load_wordnet(nltk_paths=[str(tmp_path)], dict_dirs=[str(tmp_path)], cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert "python -m nltk.downloader wordnet" in message and "apt-get install wordnet-base" in message
    assert str(tmp_path) in message


def test_wnsearchdir_is_searched_first(monkeypatch, tmp_path):
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path))
    assert augment.wordnet_dict_dirs()[0] == str(tmp_path)


needs_debian_wordnet = pytest.mark.skipif(not os.path.isfile("/usr/share/wordnet/index.noun"),
                                          reason="needs Debian's WordNet files: apt-get install wordnet-base")


@needs_debian_wordnet
def test_nltk_downloaders_zipped_corpus_is_used_first(tmp_path, monkeypatch):
    """The form `python -m nltk.downloader wordnet` leaves: corpora/wordnet.zip holding wordnet/."""
    import nltk

    corpus = augment.install_as_nltk_corpus("/usr/share/wordnet", str(tmp_path / "staging"))
    nltk_data = tmp_path / "nltk_data"
    (nltk_data / "corpora").mkdir(parents=True)
    with zipfile.ZipFile(nltk_data / "corpora" / "wordnet.zip", "w", zipfile.ZIP_STORED) as archive:
        for name in os.listdir(corpus):
            archive.write(os.path.join(corpus, name), f"wordnet/{name}")
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data)])  # NLTK reads only below its data paths
    reader = load_wordnet(nltk_paths=[str(nltk_data)], dict_dirs=[], cache_dir=str(tmp_path / "unused"))
    assert "automobile" in reader.synsets("car")[0].lemma_names()
    assert not (tmp_path / "unused").exists()


@needs_debian_wordnet
def test_debian_database_becomes_an_nltk_corpus(tmp_path):
    reader = load_wordnet(nltk_paths=[str(tmp_path / "no_nltk_data")], dict_dirs=["/usr/share/wordnet"],
                          cache_dir=str(tmp_path / "cache"))
    lexnames = (tmp_path / "cache" / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[0] == "00\tadj.all\t3" and lexnames[44] == "44\tadj.ppl\t3"
    assert lexnames[3] == "03\tnoun.Tops\t1" and lexnames[29] == "29\tverb.body\t2"
    car = reader.synsets("car")[0]
    assert "automobile" in car.lemma_names() and car.lexname() == "noun.artifact"


WORDS = ("large", "dog", "car", "house", "small", "run", "bright", "water", "stone", "light")


def child_reads_wordnet(parent_pid, queue):
    from open_clip_safe import augment

    def no_second_load():
        raise AssertionError("the worker parsed WordNet again")

    augment.load_wordnet = no_second_load
    reader = augment.default_wordnet()
    parent = augment._READERS[parent_pid]
    shared_files = set(map(id, parent._data_file_map.values())) & set(map(id, reader._data_file_map.values()))
    lookups = [[synset.name() for synset in reader.synsets(word)] for word in WORDS * 20]
    queue.put((reader is not parent, reader._lemma_pos_offset_map is parent._lemma_pos_offset_map,
               not shared_files, lookups))


def test_forked_workers_reuse_the_parsed_wordnet_with_their_own_files(wordnet):
    """A reader inherited through fork shares open files' read positions with the parent's: two
    data-loader workers then read wrong synsets (seen as 'No WordNet synset found' and a crash).
    Each worker copies the parent's parsed indexes and opens its own files, without parsing again."""
    import multiprocessing

    EdaAugmenter().synonyms("large")  # the parent's reader has its files open
    expected = [[synset.name() for synset in wordnet.synsets(word)] for word in WORDS]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=child_reads_wordnet, args=(os.getpid(), queue)) for _ in range(2)]
    for child in children:
        child.start()
    for _ in range(20):  # the parent reads at the same time
        assert [[synset.name() for synset in wordnet.synsets(word)] for word in WORDS] == expected
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    for own_reader, shares_indexes, own_files, lookups in results:
        assert own_reader and shares_indexes and own_files
        assert lookups == expected * 20
