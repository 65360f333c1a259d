"""The challenge's evaluation: the ConvNet, DSA, one round's training (``protocol``), rounds trained
together (``stacked_rounds``), their resume state, and the entry that picks between them (``entry``)."""
