// Emulator stand-in: __half / __nv_bfloat16 with the device's conversions (qk_emu/half.h).
#pragma once
#include "qk_emu/half.h"
