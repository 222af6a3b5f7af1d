"""Data: `sources` reads the offline files of DESIGN.md section 4 (no pickle runs),
`tfds_builders` serves them (and TFDS's catalogue online) as one TFDS pipeline (the offline
builders in `local_builders`, the wiki split in `splits`), `text` trains the LM tokenizer and
packs rows, `cloze` builds and scores the CBT-style test, `images` turns dataset pixels into a
model's inputs."""
