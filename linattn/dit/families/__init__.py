"""One selector per diffusers video DiT family (linattn.dit.selectors explains the interface).

Each module reproduces its family's stock processor exactly, calling diffusers' own helpers where
they are importable, so that softmax layers and hybrid layers at r = 1 give the original outputs.
They import diffusers; linattn.dit.selectors loads them on first use.
"""
