"""SafeCLIP's augmentations: the authors' image pipeline and EDA captions with WordNet synonyms.

WordNet comes from NLTK's data when it is installed; otherwise from Debian's `wordnet-base`
database files, which this module turns into an NLTK corpus (they lack only `lexnames`). With no
WordNet anywhere it raises, naming what to install: a caption augmenter without synonyms would be
a weaker defense that nobody asked for.
"""
import copy
import os
import random
import re
import shutil
import warnings

import torch
from open_clip.transform import _convert_to_rgb
from torchvision import transforms

from open_clip_safe.photometric import (AUTHORS_BLUR_SIGMA, AUTHORS_GRAYSCALE_P, AUTHORS_JITTER, AUTHORS_JITTER_P,
                                        Photometric, gaussian_blur)

# ---------------------------------------------------------------- images


def blur_kernel_size(image_size):
    """The largest odd size not above a tenth of the image (21 at 224 px, as the authors), at least 3."""
    return max(3, (int(0.1 * image_size) - 1) // 2 * 2 + 1)


AUTHORS_CROP_SCALE = 0.08  # torchvision's RandomResizedCrop default, as the authors use it


class SeparableGaussianBlur(torch.nn.Module):
    """torchvision's GaussianBlur(kernel_size, sigma) on a PIL image, as a row and a column pass, then
    ToTensor: the same kernel and the same draw of sigma from torch's RNG (so a seed gives the same views
    as before), at 2k instead of k^2 multiplies a pixel (k is 21 at 224 px)."""

    def __init__(self, kernel_size, sigma=AUTHORS_BLUR_SIGMA):
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, tuple(sigma)

    def forward(self, image):
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1])  # as transforms.GaussianBlur.get_params
        pixels = transforms.functional.pil_to_tensor(image).unsqueeze(0).float().div_(255)
        return gaussian_blur(pixels, sigma, self.kernel_size)[0]

    def __repr__(self):
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, sigma={self.sigma})"


def safeclip_image_augment(image_size, mean, std, crop_scale=AUTHORS_CROP_SCALE, jitter=AUTHORS_JITTER,
                           sigma=AUTHORS_BLUR_SIGMA):
    """One augmented view, as the authors' SafeCLIP: SimCLR-style crop, flip, jitter, grey, blur, all in the
    data-loader worker (--safeclip-augment-on workers).

    `crop_scale` is the smallest crop area: at 32 px an 8% crop (9 px) often misses the object its
    caption names, so small-image runs may raise it (--safeclip-crop-scale).
    """
    return transforms.Compose([
        *worker_half(image_size, crop_scale),
        transforms.RandomApply([transforms.ColorJitter(*jitter)], p=AUTHORS_JITTER_P),
        transforms.RandomGrayscale(p=AUTHORS_GRAYSCALE_P),
        SeparableGaussianBlur(blur_kernel_size(image_size), sigma),
        transforms.Normalize(mean=mean, std=std),
    ])


def worker_half(image_size, crop_scale):
    """What every SafeCLIP view does in the worker: the geometric part, which needs the full-size image."""
    return [_convert_to_rgb, transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)),
            transforms.RandomHorizontalFlip()]


def worker_views(image_size, crop_scale=AUTHORS_CROP_SCALE):
    """The workers' half of a view under --safeclip-augment-on device: crop and flip to a uint8 tensor
    (a quarter of the bytes of a float one to copy); photometric.Photometric does the rest on the device."""
    return transforms.Compose([*worker_half(image_size, crop_scale), transforms.PILToTensor()])


def preprocess_geometry(preprocess):
    """(image size, mean, std) of an open_clip preprocess."""
    size = next(t.size for t in preprocess.transforms if isinstance(t, (transforms.RandomResizedCrop,
                                                                         transforms.Resize)))
    normalize = next(t for t in preprocess.transforms if isinstance(t, transforms.Normalize))
    return (size if isinstance(size, int) else size[0]), normalize.mean, normalize.std


def image_views_like(preprocess, crop_scale=AUTHORS_CROP_SCALE, on_device=False, jitter=AUTHORS_JITTER,
                     sigma=AUTHORS_BLUR_SIGMA):
    """The authors' views at the size and normalisation of an open_clip preprocess, as (the workers'
    transform, the batch transform on the device or None)."""
    size, mean, std = preprocess_geometry(preprocess)
    if on_device:
        return worker_views(size, crop_scale), Photometric(mean, std, blur_kernel_size(size), jitter, sigma)
    return safeclip_image_augment(size, mean, std, crop_scale, jitter, sigma), None


def image_augment_like(preprocess, crop_scale=AUTHORS_CROP_SCALE):
    """`safeclip_image_augment` with the image size and normalisation of an open_clip preprocess."""
    return image_views_like(preprocess, crop_scale)[0]


# ---------------------------------------------------------------- WordNet

DEBIAN_WORDNET_DIRS = ("/usr/share/wordnet",)
WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")) + \
    tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
# WordNet 3.0's lexicographer files, in file-number order (lexnames(5WN)); Debian ships no `lexnames`.
LEXICOGRAPHER_FILES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl").split()
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetMissing(RuntimeError):
    pass


def lexnames_text():
    return "".join(f"{number:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                   for number, name in enumerate(LEXICOGRAPHER_FILES))


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "open_clip_safe", "nltk_data")


def wordnet_dict_dirs():
    """Where WordNet's own tools look for the database ($WNSEARCHDIR, $WNHOME/dict), then Debian's."""
    dirs = []
    if os.environ.get("WNSEARCHDIR"):
        dirs.append(os.environ["WNSEARCHDIR"])
    if os.environ.get("WNHOME"):
        dirs.append(os.path.join(os.environ["WNHOME"], "dict"))
    return dirs + list(DEBIAN_WORDNET_DIRS)


def install_as_nltk_corpus(dict_dir, cache_dir):
    """Copy a WordNet database into `cache_dir`/corpora/wordnet with a generated `lexnames`.

    A copy, not symlinks: NLTK refuses to read files that resolve outside its data paths.
    `lexnames` is written last, so its presence marks a complete copy.
    """
    corpus = os.path.join(cache_dir, "corpora", "wordnet")
    if not os.path.exists(os.path.join(corpus, "lexnames")):
        os.makedirs(corpus, exist_ok=True)
        for name in WORDNET_FILES:
            shutil.copyfile(os.path.join(dict_dir, name), os.path.join(corpus, name))
        temporary = os.path.join(corpus, f"lexnames.{os.getpid()}")
        with open(temporary, "w") as out:
            out.write(lexnames_text())
        os.replace(temporary, os.path.join(corpus, "lexnames"))
    return corpus


def load_wordnet(nltk_paths=None, dict_dirs=None, cache_dir=None):
    """An NLTK WordNet reader: NLTK's installed corpus, else a WordNet database such as Debian's.

    `nltk_paths` defaults to nltk.data.path, `dict_dirs` to `wordnet_dict_dirs()`, `cache_dir`
    (where a database is turned into an NLTK corpus, and which joins nltk.data.path) to
    ~/.cache/open_clip_safe/nltk_data.
    """
    import nltk

    nltk_paths = list(nltk.data.path if nltk_paths is None else nltk_paths)
    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):
        try:
            return wordnet_reader(nltk.data.find(resource, paths=nltk_paths))
        except LookupError:
            pass
    searched = list(wordnet_dict_dirs() if dict_dirs is None else dict_dirs)
    for dict_dir in searched:
        if all(os.path.isfile(os.path.join(dict_dir, name)) for name in WORDNET_FILES):
            cache_dir = os.path.abspath(cache_dir or default_cache_dir())
            corpus = install_as_nltk_corpus(dict_dir, cache_dir)
            if cache_dir not in nltk.data.path:
                nltk.data.path.append(cache_dir)  # NLTK reads only below its data paths
            return wordnet_reader(corpus)
    raise WordNetMissing(
        "EDA caption augmentation needs WordNet, found neither NLTK's corpus (searched "
        f"{nltk_paths}) nor a WordNet database (searched {searched}). Install one: "
        "`python -m nltk.downloader wordnet`, or on Debian/Ubuntu `apt-get install wordnet-base`; "
        "or train with --safeclip-text-aug none.")


def wordnet_reader(root):
    """NLTK's reader without its multilingual (OMW) part, which EDA does not use."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNetReader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # the OMW mapping to WordNet 3.0 needs index.sense, which Debian does not ship

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The multilingual functions are not available")
        return EnglishWordNetReader(root, None)


_READERS = {}


def default_wordnet():
    """One reader per process: a reader inherited through fork shares its open files' read
    positions with the parent's, and concurrent lookups then read the wrong synsets. A forked
    process (a data-loader worker; every sub-epoch starts new ones) copies the inherited reader
    with its data files closed instead of parsing WordNet's index again (seconds a worker)."""
    pid = os.getpid()
    if pid not in _READERS:
        inherited = next(iter(_READERS.values()), None)
        _READERS[pid] = load_wordnet() if inherited is None else reopened(inherited)
    return _READERS[pid]


def reopened(reader):
    """`reader` sharing its parsed indexes, with none of its open files (NLTK reopens them on use)."""
    if not hasattr(reader, "_data_file_map"):  # an NLTK whose reader keeps its files elsewhere
        return load_wordnet()
    own = copy.copy(reader)
    own._data_file_map = {}
    own._key_count_file = own._key_synset_file = None
    return own


# ---------------------------------------------------------------- EDA captions


def clean_caption(caption):
    """EDA's normalisation: lower case, apostrophes dropped, every other non-letter a space."""
    text = caption.lower().replace("’", "").replace("'", "")
    return re.sub(r"[^a-z]+", " ", text).strip()


class EdaAugmenter:
    """EDA (Wei & Zou, 2019) as SafeCLIP applies it: one randomly chosen operation per caption.

    Operations: synonym replacement, random insertion of a synonym, random swap (each on
    n = max(1, int(alpha * words)) words) and random deletion (each word with probability p_delete).
    Picklable for data-loader workers: the WordNet reader is reloaded per process.
    """

    OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")

    def __init__(self, alpha=0.1, p_delete=0.1, wordnet=None):
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # here: scikit-learn takes seconds to import

        self.alpha, self.p_delete = alpha, p_delete
        self.stop_words = ENGLISH_STOP_WORDS
        self._own_wordnet = wordnet
        if wordnet is None:
            default_wordnet()  # fail at construction, not in a worker
        self._synonyms = {}

    @property
    def _wordnet(self):
        return self._own_wordnet or default_wordnet()

    def __getstate__(self):
        return {"alpha": self.alpha, "p_delete": self.p_delete}

    def __setstate__(self, state):
        self.__init__(**state)

    def synonyms(self, word):
        """WordNet lemmas of every sense of `word`, cleaned like captions, without `word` itself."""
        if word not in self._synonyms:
            found = {clean_caption(lemma.name().replace("_", " "))
                     for synset in self._wordnet.synsets(word) for lemma in synset.lemmas()}
            self._synonyms[word] = sorted(found - {word, ""})  # sorted: same choice under a seed
        return self._synonyms[word]

    def __call__(self, caption, rng):
        """An augmented caption; `rng` is a random.Random or a seed. A caption without letters is returned as is."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        words = clean_caption(caption).split()
        if not words:
            return caption
        operation = getattr(self, rng.choice(self.OPERATIONS))
        return " ".join(operation(words, rng))

    def count(self, words):
        return max(1, int(self.alpha * len(words)))

    def synonym_replacement(self, words, rng):
        """Replace every occurrence of up to n distinct non-stop words with one synonym each."""
        words = list(words)
        candidates = sorted({word for word in words if word not in self.stop_words})
        rng.shuffle(candidates)
        replaced = 0
        for word in candidates:
            synonyms = self.synonyms(word)
            if synonyms:
                synonym = rng.choice(synonyms)
                words = [synonym if w == word else w for w in words]
                replaced += 1
                if replaced >= self.count(words):
                    break
        return words

    def random_insertion(self, words, rng):
        """Insert, n times, a synonym of a random word at a random position (10 tries for a word with one)."""
        words = list(words)
        for _ in range(self.count(words)):
            for _ in range(10):
                synonyms = self.synonyms(rng.choice(words))
                if synonyms:
                    words.insert(rng.randint(0, len(words)), rng.choice(synonyms))
                    break
        return words

    def random_swap(self, words, rng):
        words = list(words)
        for _ in range(self.count(words)):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        return words

    def random_deletion(self, words, rng):
        """Drop each word with probability p_delete; never all of them."""
        if len(words) == 1:
            return list(words)
        kept = [word for word in words if rng.random() > self.p_delete]
        return kept or [rng.choice(words)]
