"""Offline evaluation of the recommender's LightFM pipeline: datasets, ranking metrics, the command.

Not part of the serving package (snaplearn_recommender never imports this one): it reuses the
serving package's feature code so that what is evaluated is what serves.
"""
