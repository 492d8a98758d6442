/* The decode step in portable C (any CPU; on x86-64 the compiler's baseline SSE2): forward.h without intrinsics. */
#include "forward.h"
