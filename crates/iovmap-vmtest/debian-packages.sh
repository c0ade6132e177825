# Debian packages of any suite and architecture, fetched into a cache outside the clone.
# Sourced (not run) by the guest harnesses: crates/iovmap-vmtest/matrix.sh, run.sh, and
# integrations/qemu/. Nothing is installed: packages are downloaded with `apt-get download`
# against an apt state of our own per suite, and unpacked with `dpkg-deb -x`.
#
#   . crates/iovmap-vmtest/debian-packages.sh
#   deb_kernel sid amd64 amd64          # -> DEB_KERNEL_* (below)
#   deb_fetch trixie busybox-static arm64   # -> path of the cached .deb on stdout
#   deb_source trixie qemu              # -> directory holding the .dsc and tarballs
#
# The cache: $IOVMAP_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/iovmap. Every entry is
# keyed by what it is built from (a package's file name carries its version), so a rerun
# reuses it and a new upload is fetched beside it. The package lists of a suite are
# refreshed when older than $IOVMAP_APT_MAX_AGE_H hours (default 24), so a warm rerun makes
# no network request at all.
#
# Errors go to stderr and return non-zero; the caller decides whether that fails or skips.

: "${IOVMAP_CACHE:=${XDG_CACHE_HOME:-$HOME/.cache}/iovmap}"
: "${IOVMAP_APT_MAX_AGE_H:=24}"

deb_log() { echo "debian-packages: $*" >&2; }

# The mirror apt already uses on this machine (the registry this machine may reach).
deb_mirror() {
  local uri
  uri=$(grep -hm1 -E '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $2}')
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  echo "${uri:-http://deb.debian.org/debian}"
}

# deb_apt SUITE: sets DEB_APT to the apt-get/apt-cache options for SUITE (binary and source
# indices, amd64 and arm64), updating its lists when missing or stale.
deb_apt() {
  local suite=$1 dir="$IOVMAP_CACHE/apt/$1"
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" || return 1
  if [ ! -s "$dir/debian.sources" ]; then
    printf 'Types: deb deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$(deb_mirror)" "$suite" >"$dir/debian.sources"
  fi
  DEB_APT=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null
    -o Dir::Etc::sourcelist="$dir/debian.sources" -o Dir::State::Lists="$dir/lists"
    -o Dir::Cache="$dir/cache" -o Dir::State::status=/dev/null
    -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 -o Debug::NoLocking=1)
  local stamp="$dir/updated"
  deb_apt_stale "$stamp" || return 0
  # One update at a time per suite (rows run in parallel; apt's own locking is off).
  (
    flock 9 || exit 1
    deb_apt_stale "$stamp" || exit 0
    deb_log "apt-get update ($suite)"
    if ! timeout -k 5 600 apt-get "${DEB_APT[@]}" update -qq >"$dir/update.log" 2>&1; then
      deb_log "apt-get update of suite $suite failed: $(tail -3 "$dir/update.log" | tr '\n' ' ')"
      exit 1
    fi
    touch "$stamp"
  ) 9>"$dir/.lock"
}

# deb_apt_stale STAMP: whether a suite's lists are missing or older than the maximum age.
deb_apt_stale() {
  [ ! -e "$1" ] || [ -n "$(find "$1" -mmin +$((IOVMAP_APT_MAX_AGE_H * 60)) 2>/dev/null)" ]
}

# deb_field SUITE PKG[:ARCH] FIELD: a field of the candidate version's record.
deb_field() {
  deb_apt "$1" || return 1
  apt-cache "${DEB_APT[@]}" show --no-all-versions "$2" 2>/dev/null | sed -n "s/^$3: //p" | head -1
}

# deb_fetch SUITE PKG [ARCH]: prints the path of PKG's .deb in the cache, downloading it
# if this version is not there yet.
deb_fetch() {
  local suite=$1 pkg=$2 arch=${3:-}
  local spec=$pkg${arch:+:$arch}
  local file
  file=$(deb_field "$suite" "$spec" Filename) || return 1
  [ -n "$file" ] || { deb_log "no package $spec in $suite"; return 1; }
  local out="$IOVMAP_CACHE/debs/$(basename "$file")"
  if [ ! -s "$out" ]; then
    # A download directory of this shell's own: the matrix's rows are subshells of one
    # script (one $$) and may fetch the same package at once. The rename is atomic: a
    # reader sees no file or all of it.
    local tmp="$IOVMAP_CACHE/debs/tmp.$BASHPID"
    rm -rf "$tmp" && mkdir -p "$tmp" || return 1
    deb_log "downloading $(basename "$file")"
    if ! (cd "$tmp" && timeout -k 5 900 apt-get "${DEB_APT[@]}" download -qq "$spec" >/dev/null 2>&1); then
      rm -rf "$tmp"
      deb_log "apt-get download $spec ($suite) failed"
      return 1
    fi
    mv "$tmp"/*.deb "$out" && rm -rf "$tmp" || return 1
  fi
  echo "$out"
}

# deb_unpack DEB DIR: extracts DEB into DIR once (a stamp per package marks it done).
# Rows of the matrix unpack the same package into the same directory at once on a cold
# cache: one extracts under DIR's lock while the others wait for it, and the stamp, made
# last, is what lets a reader through without the lock. (Without the lock a second
# dpkg-deb replaced files the first row was already copying: a truncated busybox, and a
# guest whose /init failed with EIO.)
deb_unpack() {
  local deb=$1 dir=$2 stamp
  stamp="$dir/.unpacked.$(basename "$1")"
  [ -e "$stamp" ] && return 0
  mkdir -p "$dir" || return 1
  (
    flock 9 || exit 1
    [ -e "$stamp" ] || { dpkg-deb -x "$deb" "$dir" && touch "$stamp"; }
  ) 9>"$dir/.lock"
}

# deb_kernel SUITE ARCH FLAVOUR: fetches and unpacks the kernel linux-image-FLAVOUR depends
# on in SUITE (the image, its modules and config, which Debian splits over several packages
# from 7.x on). Sets:
#   DEB_KERNEL_RELEASE  its `uname -r` (7.2.13+deb14-amd64)
#   DEB_KERNEL_VERSION  the Debian package version (7.2.13-1)
#   DEB_KERNEL_DIR      the unpacked tree (boot/, lib/modules/ or usr/lib/modules/)
#   DEB_KERNEL_IMAGE    the vmlinuz
#   DEB_KERNEL_CONFIG   its config
#   DEB_KERNEL_MODULES  its modules directory
deb_kernel() {
  local suite=$1 arch=$2 flavour=$3
  deb_apt "$suite" || return 1
  # What was found last time, while the suite's lists are unchanged: every apt-cache
  # call re-reads the lists (seconds each), and a kernel takes a dozen of them.
  local memo="$IOVMAP_CACHE/kernels/${suite}_${arch}_${flavour}.env"
  if [ -s "$memo" ] && [ "$memo" -nt "$IOVMAP_CACHE/apt/$suite/updated" ]; then
    # shellcheck disable=SC1090
    . "$memo"
    [ -s "$DEB_KERNEL_IMAGE" ] && return 0
  fi
  local image
  image=$(apt-cache "${DEB_APT[@]}" depends "linux-image-$flavour:$arch" 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ :]*\).*/\1/p' | head -1)
  [ -n "$image" ] || { deb_log "no linux-image-$flavour for $arch in $suite"; return 1; }
  DEB_KERNEL_RELEASE=${image#linux-image-}
  DEB_KERNEL_VERSION=$(deb_field "$suite" "$image:$arch" Version) || return 1
  DEB_KERNEL_DIR="$IOVMAP_CACHE/kernels/${DEB_KERNEL_RELEASE}_${DEB_KERNEL_VERSION}"
  local parts=("$image") p deb
  # 7.x: the image package only depends on its parts.
  for p in linux-binary linux-modules linux-base; do
    if [ -n "$(deb_field "$suite" "$p-$DEB_KERNEL_RELEASE:$arch" Filename)" ]; then parts+=("$p-$DEB_KERNEL_RELEASE"); fi
  done
  for p in "${parts[@]}"; do
    deb=$(deb_fetch "$suite" "$p" "$arch") || return 1
    deb_unpack "$deb" "$DEB_KERNEL_DIR" || { deb_log "cannot unpack $deb"; return 1; }
  done
  DEB_KERNEL_IMAGE=$(find "$DEB_KERNEL_DIR" -name "vmlinuz-$DEB_KERNEL_RELEASE" -o -name vmlinuz | head -1)
  DEB_KERNEL_MODULES=$(find "$DEB_KERNEL_DIR" -maxdepth 4 -type d -path "*/modules/$DEB_KERNEL_RELEASE" | head -1)
  # boot/config-<release> up to 6.x; the modules directory's config from 7.x.
  DEB_KERNEL_CONFIG=$(find "$DEB_KERNEL_DIR" -name "config-$DEB_KERNEL_RELEASE" | head -1)
  [ -n "$DEB_KERNEL_CONFIG" ] || DEB_KERNEL_CONFIG=${DEB_KERNEL_MODULES:+$DEB_KERNEL_MODULES/config}
  [ -n "$DEB_KERNEL_IMAGE" ] || { deb_log "no vmlinuz in ${parts[*]}"; return 1; }
  declare -p DEB_KERNEL_RELEASE DEB_KERNEL_VERSION DEB_KERNEL_DIR DEB_KERNEL_IMAGE DEB_KERNEL_CONFIG \
    DEB_KERNEL_MODULES 2>/dev/null | sed 's/^declare -- /declare -g /' >"$memo.$$" && mv "$memo.$$" "$memo"
  return 0
}

# deb_source SUITE SRCPKG: downloads a source package (.dsc, orig and debian tarballs) into
# the cache once per version; prints the directory.
deb_source() {
  local suite=$1 src=$2 ver dir
  deb_apt "$suite" || return 1
  ver=$(apt-cache "${DEB_APT[@]}" showsrc "$src" 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -1)
  [ -n "$ver" ] || { deb_log "no source package $src in $suite"; return 1; }
  dir="$IOVMAP_CACHE/sources/${src}_${ver#*:}"
  if [ ! -e "$dir/.complete" ]; then
    mkdir -p "$dir" || return 1
    deb_log "downloading source $src $ver"
    (cd "$dir" && timeout -k 5 1800 apt-get "${DEB_APT[@]}" source --download-only -qq "$src=$ver" >/dev/null 2>&1) \
      || { deb_log "apt-get source $src=$ver ($suite) failed"; return 1; }
    touch "$dir/.complete"
  fi
  echo "$dir"
}
