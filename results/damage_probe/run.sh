set -e
cd /work/main
D=results/damage_probe
CFG=official_configs/cpu_smollm2_prune.yml
python -m utils.damage_probe collect --config $CFG --set dtype=float32 --split train --blocks 256 --save $D/map_train256.pt
python -m utils.damage_probe collect --config $CFG --set dtype=float32 --split dev --blocks 100 --save $D/map_dev100.pt
python -m utils.damage_probe fit --fit $D/map_train256.pt --eval $D/map_dev100.pt --frac 0.5 --json $D/fit_dev_f0.5.json
python -m utils.damage_probe fit --fit $D/map_train256.pt --eval $D/map_dev100.pt --frac 0.25 --json $D/fit_dev_f0.25.json
python -m utils.damage_probe schedule --fit $D/map_train256.pt --split dev --blocks 96 --target 0.7 --features position +scalars +hidden --json $D/schedule_dev_p0.7.json
python -m utils.damage_probe schedule --fit $D/map_train256.pt --split dev --blocks 96 --target 0.5 --features position +scalars +hidden --json $D/schedule_dev_p0.5.json
