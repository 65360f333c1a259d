"""diffdistill: generative dataset distillation with a class-conditional U-ViT.

The package holds the logic of every pipeline stage; the Snakemake workflow and the scripts under
``workflow/scripts`` only wire it together. Importing the package does no work: submodules are
imported by name (``from diffdistill import uvit``).
"""

__version__ = "0.1.0"
