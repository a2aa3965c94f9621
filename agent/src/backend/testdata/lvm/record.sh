set -x
modprobe dm_mod; modprobe dm_thin_pool
OUT=/work/wt-lvm/target/lvm-record/out
export LC_ALL=C
C='activation { udev_sync = 0 udev_rules = 0 }'
disk=
for b in /sys/block/*; do [ "$(cat $b/serial 2>/dev/null)" = rec.img ] && disk=/dev/$(basename $b); done
echo disk=$disk
LVF=lv_name,vg_name,lv_uuid,lv_size,lv_path,lv_dm_path,lv_active,lv_attr,lv_tags,pool_lv,origin,segtype,data_percent,metadata_percent,zero
VGF=vg_name,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,vg_tags
rep() { name=$1; shift; lvm "$@" --reportformat json --units b --nosuffix --config "$C" >$OUT/$name.json 2>$OUT/$name.stderr; echo $? > $OUT/$name.exit; }
cmd() { name=$1; shift; lvm "$@" --config "$C" >$OUT/$name.stdout 2>$OUT/$name.stderr; echo $? > $OUT/$name.exit; }
rep vgs_missing vgs -o $VGF nosuchvg
rep lvs_missing lvs -o $LVF nosuchvg
lvm pvcreate -y $disk --config "$C"
lvm vgcreate berth-vg $disk --config "$C"
cmd vgchange_addtag vgchange --addtag berth-pool=lvm-thick berth-vg
rep vgs_empty vgs -o $VGF berth-vg
rep lvs_empty lvs -o $LVF berth-vg
cmd lvcreate_thick lvcreate -y -W y -L 100m -n berth-pvc-aa-bb berth-vg --addtag 'berth:pool=lvm-thick' --addtag 'berth:claim=db/data-db-0' --addtag 'berth:created=2026-11-29T05:51:27Z' --addtag 'berth:owner=999:999' --addtag 'berth:size=104857600'
cmd lvcreate_thick2 lvcreate -y -W y -L 10m -n berth-pvc-cc berth-vg --addtag 'berth:pool=lvm-thick'
cmd lvcreate_foreign lvcreate -y -W y -L 8m -n other berth-vg
rep vgs_thick vgs -o $VGF berth-vg
rep lvs_thick lvs -o $LVF berth-vg
rep lvs_thick_tag lvs -o $LVF berth-vg -S 'tags=berth:pool=lvm-thick'
cmd lvcreate_toolarge lvcreate -y -W y -L 5g -n berth-pvc-big berth-vg
cmd lvcreate_exists lvcreate -y -W y -L 4m -n berth-pvc-cc berth-vg
cmd lvcreate_badname lvcreate -y -W y -L 4m -n snapshot-x berth-vg
cmd lvcreate_novg lvcreate -y -W y -L 4m -n x nosuchvg
cmd lvchange_deltag lvchange --deltag 'berth:size=104857600' berth-vg/berth-pvc-aa-bb
cmd lvremove_missing lvremove -y berth-vg/nosuchlv
cmd lvchange_an lvchange -an berth-vg/berth-pvc-cc
rep lvs_inactive lvs -o $LVF berth-vg/berth-pvc-cc
cmd lvchange_ay lvchange -ay berth-vg/berth-pvc-cc
# thin pool
cmd lvcreate_thinpool lvcreate -y -L 512m -T berth-vg/thin
cmd lvcreate_thin1 lvcreate -y -V 300m -T berth-vg/thin -n berth-pvc-t1 --addtag 'berth:pool=lvm-thin'
cmd lvcreate_thin2 lvcreate -y -V 1g -T berth-vg/thin -n berth-pvc-t2 --addtag 'berth:pool=lvm-thin'
dd if=/dev/urandom of=$(lvm lvs --noheadings -o lv_dm_path berth-vg/berth-pvc-t1 --config "$C" | tr -d ' ') bs=1M count=20 oflag=direct
cmd lvcreate_snap lvcreate -y -s berth-vg/berth-pvc-t1 -n snap1
cmd lvcreate_thicksnap lvcreate -y -s -L 8m berth-vg/berth-pvc-cc -n snapthick
rep vgs_thin vgs -o $VGF berth-vg
rep lvs_thin lvs -o $LVF berth-vg
rep lvs_all_a lvs -a -o $LVF berth-vg
cmd lvcreate_thin_toolarge lvcreate -y -L 5g -T berth-vg/thin2
cmd lvcreate_thin_over lvcreate -y -V 10g -T berth-vg/thin -n over
rep lvs_thin_over lvs -o $LVF berth-vg
cmd lvremove_thin lvremove -y berth-vg/over
cmd lvs_version version
ls -l /dev/mapper /dev/berth-vg > $OUT/devnodes.txt 2>&1
mkfs.xfs -q /dev/mapper/berth--vg-berth--pvc--cc > $OUT/mkfs_xfs_small.txt 2>&1; echo $? >> $OUT/mkfs_xfs_small.txt
mkfs.xfs -q /dev/mapper/berth--vg-berth--pvc--t1 > $OUT/mkfs_xfs_300.txt 2>&1; echo $? >> $OUT/mkfs_xfs_300.txt
blkdiscard -z /dev/mapper/berth--vg-berth--pvc--cc > $OUT/blkdiscard.txt 2>&1; echo $? >> $OUT/blkdiscard.txt
echo done

# Recorded later (issue 19), in a boot of its own on a fresh disk, with this script's first lines (up to `rep`) and
# then what follows instead of the rest: the open count (lv_device_open) of a mounted, an unmounted and an inactive
# LV, and the physical extents of an LV grown onto named extents (lvs --segments). Its stderr has lvm2's
# descriptor warnings (the guest's virtio ports).
#   LVF=$LVF,lv_device_open
#   lvm pvcreate -y $disk; lvm vgcreate -s 4m berth-vg $disk
#   lvm lvcreate -y -W y -L 8m -n berth-pvc-open berth-vg     (and berth-pvc-closed, berth-pvc-inactive)
#   lvm lvchange -an berth-vg/berth-pvc-inactive
#   mkfs.ext4 -q /dev/mapper/berth--vg-berth--pvc--open; mount it at /tmp/m
#   rep lvs_device_open lvs -o $LVF berth-vg; umount /tmp/m
#   lvm lvcreate -y -l 4 -n berth-pvc-x.grow berth-vg; r=$(lvm lvs --noheadings --segments -o seg_pe_ranges berth-vg/berth-pvc-x.grow)
#   lvm lvremove -y berth-vg/berth-pvc-x.grow; lvm lvextend -L 24m berth-vg/berth-pvc-closed $r
#   rep lvs_segments_extended lvs --segments -o seg_pe_ranges berth-vg/berth-pvc-closed
