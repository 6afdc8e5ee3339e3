"""The inference core: a promoted model folder loaded, checked and run, with the maths evaluate
fitted applied by the very same functions (no web framework here; chestct.serving, the research
helpers and bench/ call it).

A promoted folder holds the card (model.json, read as a `chestct.modelcard.ModelCard`), the
light model, the Keras model, the dense head and the OOD statistics, each pinned by its sha256
in the card. Every file the card lists (`ModelCard.files`: any entry with a `file`, and the
`files` map a new model family may use) is hashed at every load and hot reload before any is
read, and read only through `ModelFiles`, which refuses a name the card does not list.
Preprocessing is `chestct.imaging.preparation.prepare_slice` with the card's settings; calibration,
entropy, the abstain and out-of-distribution rules and the Mahalanobis distance come from
`chestct.evaluation.metrics`, where evaluate fits them.

A model folder is read through one open directory handle, so that a folder swapped in by
promote (renameat2 exchange) is seen whole: the card and the files it names always come from
the same folder. Each worker checks model.json's identity at most every `reload_check_s`
seconds; a new folder that cannot be served is refused with a logged error while the current
model keeps serving.

What a prediction carries, all computed without TensorFlow from the light model's outputs:
calibrated probabilities (temperature scaling of the logits), the normalised predictive entropy
with an abstain flag (threshold from the card), MC-dropout through the dense head (the only
dropout in the network sits between global pooling and the head, so sampling it on the pooled
features is exactly MC-dropout of the whole network), the Mahalanobis distance of the pooled
features from the training set (out-of-distribution score), and Grad-CAM, which for a
GAP -> dense head is the class activation map with the head's weights.

The core in modules: `loaded` (the loaded model and the errors of loading one), `artefact`
(an exported model run without a card), `analysis` (outputs to an answer), `explain`,
`folder` (load and check a promoted folder) and `predictor` (what a worker holds).
"""
