"""The model core: the network, tokenizer, image preprocessing, checkpoints (own and foreign formats),
devices, the shared-prefix text encoder and the catalogue of downloadable models. It never prints."""
