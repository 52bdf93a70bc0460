"""`python -m kdship ...`: what launchers run (`torchrun --nproc-per-node 2 -m kdship distill ...`)."""

from kdship.cli import main

main()
