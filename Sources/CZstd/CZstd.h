// libzstd's one-shot compression API, for the repository's frames.
#include <zstd.h>
