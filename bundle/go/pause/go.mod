// The pod sandbox ("pause") process, built here instead of upstream's pause.c (no static C toolchain needed).
module kvmlab.dev/bundle/pause

go 1.26.0
