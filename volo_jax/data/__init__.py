"""Input side: TF image transforms and tf.data pipelines (nothing here knows about the model)."""
