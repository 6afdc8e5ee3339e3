"""chestct: a DVC + MLflow pipeline that trains, promotes and serves a chest CT slice classifier.

Research software, not a medical device.
"""

__version__ = "0.1.0"
