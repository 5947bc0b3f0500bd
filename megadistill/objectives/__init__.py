"""What is optimized, given a batch and a teacher signal: language modelling (``lm``) and its KD spec (``spec``)."""
