// Emulator stand-in for the CUDA runtime header: everything comes from the force-included prelude.
#pragma once
#include "qk_emu/prelude.h"
