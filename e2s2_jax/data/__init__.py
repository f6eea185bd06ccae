"""TensorFlow-side data layer: SeqIO preprocessors, feature converters, vocabularies."""
