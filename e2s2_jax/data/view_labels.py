"""The per-position labels of an encoder-side second view, shared by the data layer (which writes
them) and the objectives (which read them); no TensorFlow, no JAX.

E2S2's view N: 0 untouched, 1 moved by the trigram shuffle, 2 replaced (METHODS.md section 1).
RTS / C-RTS / SLM's swapped view: 0 original, 1 replaced. An example without a second view (a
span-corruption or SSR example in a mixture with E2S2 or RTS ones) carries a copy of its inputs
as the view and NO_SECOND_VIEW at every position, so it contributes no encoder term.

The same-document task's pair labels (one per example, repeated at each of its input positions):
0 both spans from one paragraph, 1 from two paragraphs of one document, 2 from two documents;
NO_PAIR for an example without a pair (span corruption mixed with it), which adds no
same-document term.
"""

E2S2_UNTOUCHED = 0
E2S2_SHUFFLED = 1
E2S2_REPLACED = 2

SWAP_ORIGINAL = 0
SWAP_REPLACED = 1

# Above every class label, below the feature converter's packing base (feature_converters.py
# packs `token * LABEL_BASE + label + 1`).
NO_SECOND_VIEW = 3
LABEL_BASE = 8

SAME_PARAGRAPH = 0
SAME_DOCUMENT = 1
DIFFERENT_DOCUMENT = 2
NUM_PAIR_CLASSES = 3
NO_PAIR = 3
# The decoder target of each pair label (a T5-style text-to-text answer).
PAIR_LABEL_NAMES = ("same paragraph", "same document", "different document")
