"""The jobs: classify, embed, the zero-shot classifier, evaluation, and what they share (inputs,
labels, the decode pipeline, caches, embedding files). A job takes plain arguments and returns
values or yields rows; it never parses argv and never prints."""
